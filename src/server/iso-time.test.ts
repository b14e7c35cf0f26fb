import { isoTime } from "./iso-time.js";

describe("isoTime", () => {
  it("renders what toISOString renders", () => {
    const samples = [0, 1, 999, 1_000, 59_999, 86_399_999, Date.UTC(2026, 11, 7, 8, 9, 10, 11), Date.UTC(2000, 1, 29, 23, 59, 59, 999), Date.UTC(99, 0, 1), -1, Date.UTC(9999, 11, 31, 23, 59, 59, 999)];
    for (let i = 0; i < 1000; i++) samples.push(Math.floor(Math.random() * 253_402_300_799_999));
    for (const ms of samples) {
      expect(isoTime(ms)).toBe(new Date(ms).toISOString());
      expect(isoTime(new Date(ms))).toBe(new Date(ms).toISOString());
    }
  });
  it("takes toISOString's expanded years and its error outside 0000-9999", () => {
    for (const ms of [Date.UTC(10000, 0, 1), Date.UTC(-1, 0, 1), -62_167_219_200_001]) expect(isoTime(ms)).toBe(new Date(ms).toISOString());
    expect(() => isoTime(NaN)).toThrow(RangeError);
  });
  it("defaults to now", () => {
    const before = Date.now();
    const t = Date.parse(isoTime());
    expect(t).toBeGreaterThanOrEqual(before);
    expect(t).toBeLessThanOrEqual(Date.now());
  });
});
