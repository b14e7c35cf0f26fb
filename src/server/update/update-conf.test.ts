/** update.conf: SERVER= replaced with every other line kept, and the original put back byte for byte. */
import { mkdtemp, readFile, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createUpdateConf, withServer } from "./update-conf.js";

let dir: string;
beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), "upd-conf-"));
});
afterEach(async () => {
  await rm(dir, { recursive: true, force: true });
});

test("withServer replaces SERVER= in place, keeps comments and other keys, and appends it when missing", () => {
  expect(withServer("# c\nGROUP=disabled\nSERVER=disabled\nX=1\n", "http://l/")).toBe("# c\nGROUP=disabled\nSERVER=http://l/\nX=1\n");
  expect(withServer("GROUP=stable", "http://l/")).toBe("GROUP=stable\nSERVER=http://l/\n");
  expect(withServer("", "http://l/")).toBe("SERVER=http://l/\n");
  expect(withServer("SERVER=a\nSERVER=b\n", "http://l/")).toBe("SERVER=http://l/\n# SERVER=b (piccolod: a later SERVER= would win)\n");
});

test("pointAt then restore gives back the same bytes and mode, also after a second pointAt", async () => {
  const f = join(dir, "update.conf");
  const original = "# keep\r\nGROUP=disabled\nSERVER=disabled\n\n";
  await writeFile(f, original, { mode: 0o640 });
  const c = createUpdateConf(f, join(dir, "saved.json"));
  await c.pointAt("http://127.0.0.1:1/v1/update/");
  await c.pointAt("http://127.0.0.1:2/v1/update/");
  expect((await c.read())["SERVER"]).toBe("http://127.0.0.1:2/v1/update/");
  // A new instance (as after a restart) finds the saved original.
  expect(await createUpdateConf(f, join(dir, "saved.json")).restore()).toBe(true);
  expect(await readFile(f, "utf8")).toBe(original);
  expect((await stat(f)).mode & 0o777).toBe(0o640);
  expect(await c.restore()).toBe(false);
});

test("a file that did not exist is removed again", async () => {
  const f = join(dir, "update.conf");
  const c = createUpdateConf(f, join(dir, "saved.json"));
  await c.pointAt("http://127.0.0.1:1/");
  expect(await readFile(f, "utf8")).toBe("SERVER=http://127.0.0.1:1/\n");
  await c.restore();
  await expect(stat(f)).rejects.toMatchObject({ code: "ENOENT" });
});
