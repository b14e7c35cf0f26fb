import type { ProgressMessage } from "./docker.js";
import { createPullTracker, formatBytes } from "./images.js";

const dl = (id: string, current: number, total: number): ProgressMessage => ({ status: "Downloading", id, progressDetail: { current, total } });
const ex = (id: string, current: number, total: number): ProgressMessage => ({ status: "Extracting", id, progressDetail: { current, total } });
const st = (id: string, status: string): ProgressMessage => ({ status, id });

test("a pull's layers are followed one by one to 100% of the downloaded bytes", () => {
  const t = createPullTracker();
  t.update({ status: "Pulling from app", id: "1" });
  for (const id of ["aaaaaaaaaaaa", "bbbbbbbbbbbb", "cccccccccccc"]) t.update(st(id, "Pulling fs layer"));
  t.update(st("cccccccccccc", "Already exists"));
  t.update(dl("aaaaaaaaaaaa", 100, 1000));
  t.update(dl("bbbbbbbbbbbb", 50, 500));
  let p = t.progress();
  expect(p).toMatchObject({ phase: "download", bytesDone: 150, bytesTotal: 1500 });
  expect(p.message).toMatch(/^1\/3 layers done; aaaaaaaaaaaa downloading 100 B\/1.00 kB, bbbbbbbbbbbb downloading 50 B\/500 B$/);
  t.update(dl("aaaaaaaaaaaa", 1000, 1000));
  t.update(st("aaaaaaaaaaaa", "Download complete"));
  t.update(st("bbbbbbbbbbbb", "Download complete"));
  p = t.progress();
  expect(p).toMatchObject({ phase: "extract", bytesDone: 0, bytesTotal: 1500 });
  expect(p.percent).toBeCloseTo(50);
  t.update(ex("aaaaaaaaaaaa", 1000, 1000));
  t.update(st("aaaaaaaaaaaa", "Pull complete"));
  t.update(ex("bbbbbbbbbbbb", 250, 500));
  p = t.progress();
  expect(p).toMatchObject({ phase: "extract", bytesDone: 1250, bytesTotal: 1500 });
  t.update(st("bbbbbbbbbbbb", "Pull complete"));
  t.update({ status: "Status: Downloaded newer image for app:1" });
  // The tracker never claims 100%: that is said once the image is there.
  expect(t.progress().percent).toBe(99);
  expect(t.layers()).toEqual([
    { id: "aaaaaaaaaaaa", sizeBytes: 1000, alreadyPresent: false },
    { id: "bbbbbbbbbbbb", sizeBytes: 500, alreadyPresent: false },
    { id: "cccccccccccc", sizeBytes: 0, alreadyPresent: true },
  ]);
  expect(t.status).toBe("Downloaded newer image for app:1");
});

test("a download resumed after a retry keeps its full size and does not go backwards", () => {
  // Recorded from the engine: after "Retrying", it reports on the rest of the layer only.
  const t = createPullTracker();
  t.update(dl("04b674e645a8", 2_382_848, 3_146_839));
  t.update(st("04b674e645a8", "Retrying in 5 seconds"));
  expect(t.progress().bytesDone).toBe(2_382_848);
  t.update(dl("04b674e645a8", 10_000, 26_711));
  expect(t.progress()).toMatchObject({ bytesDone: 3_146_839 - 26_711 + 10_000, bytesTotal: 3_146_839 });
  t.update(dl("04b674e645a8", 26_711, 26_711));
  t.update(st("04b674e645a8", "Download complete"));
  expect(t.progress()).toMatchObject({ phase: "extract", bytesTotal: 3_146_839 });
  expect(t.layers()).toEqual([{ id: "04b674e645a8", sizeBytes: 3_146_839, alreadyPresent: false }]);
});

test("a layer that skipped its download updates takes its size from extraction", () => {
  const t = createPullTracker();
  t.update(st("dddddddddddd", "Pulling fs layer"));
  t.update(st("dddddddddddd", "Download complete"));
  t.update(ex("dddddddddddd", 107, 107));
  t.update(st("dddddddddddd", "Pull complete"));
  expect(t.layers()).toEqual([{ id: "dddddddddddd", sizeBytes: 107, alreadyPresent: false }]);
});

test("layers whose size is not known yet hold the percent back", () => {
  const t = createPullTracker();
  t.update(st("aaaaaaaaaaaa", "Pulling fs layer"));
  t.update(st("bbbbbbbbbbbb", "Waiting"));
  t.update(dl("aaaaaaaaaaaa", 1000, 1000));
  // Half the layers known, that half fully downloaded: 25% of the download half.
  expect(t.progress().percent).toBeCloseTo(25);
});

test("formatBytes speaks the engine's decimal units", () => {
  expect(formatBytes(107)).toBe("107 B");
  expect(formatBytes(3_146_839)).toBe("3.15 MB");
  expect(formatBytes(32_300)).toBe("32.3 kB");
  expect(formatBytes(2_000_000_000)).toBe("2.00 GB");
});
