import { classifySnapshotPaths, scopeFromTags, stateExcludedNames, tagsFor, within } from "./scope.js";

const roots = { stateDir: "/var/lib/piccolod", credentialDirs: ["/var/lib/piccolod/credstore", "/var/lib/piccolod/credstore.meta"] };

test("tags record the scope and read back", () => {
  const tags = tagsFor(
    [
      { part: "state", path: roots.stateDir },
      { part: "volume", volume: "b", path: "/d/volumes/b/_data" },
      { part: "volume", volume: "a", path: "/d/volumes/a/_data" },
    ],
    ["nightly"],
  );
  expect(tags).toEqual(["piccolod", "scope:state", "volume:b", "volume:a", "nightly"]);
  expect(scopeFromTags(tags)).toEqual({ state: true, credentials: false, volumes: ["a", "b"], allVolumes: false });
});

test("a snapshot path outside the scope folders is reported, inside ones are classified", () => {
  const tags = ["piccolod", "scope:state", "volume:a"];
  const mounts = new Map([["a", "/d/volumes/a/_data"]]);
  expect(classifySnapshotPaths(["/var/lib/piccolod", "/old-root/volumes/a/_data"], tags, roots, mounts)).toEqual({
    items: [
      { part: "state", path: "/var/lib/piccolod" },
      { part: "volume", volume: "a", path: "/old-root/volumes/a/_data" },
    ],
    outside: [],
  });
  // Not tagged as a volume, a parent of the state folder, a sibling with a common prefix.
  for (const p of ["/d/volumes/b/_data", "/var/lib", "/var/lib/piccolod-other", "/etc"]) {
    expect(classifySnapshotPaths([p], tags, roots, mounts).outside).toEqual([p]);
  }
  // The sealed secrets only with their tag.
  expect(classifySnapshotPaths(["/var/lib/piccolod/credstore"], tags, roots, mounts).outside).toHaveLength(1);
});

test("within() is by path component, and the state part leaves the daemon's own folders out", () => {
  expect(within("/a/b", "/a")).toBe(true);
  expect(within("/a", "/a/")).toBe(true);
  expect(within("/ab", "/a")).toBe(false);
  expect(stateExcludedNames(roots, false)).toEqual(["operations", "backup", "audit.log", "credstore", "credstore.meta"]);
  expect(stateExcludedNames(roots, true)).toEqual(["operations", "backup", "audit.log"]);
});
