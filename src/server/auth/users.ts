/**
 * Local users for Login: scrypt password hashes and a per-user lock after repeated failures, in
 * <stateDir>/auth/users.json (mode 0600). Failures of unknown user names are counted too (in
 * memory), and a wrong user name costs the same scrypt work as a wrong password, so neither
 * timing nor the lock tells which user names exist.
 */
import { randomBytes, scrypt, timingSafeEqual } from "node:crypto";
import { chmod, mkdir, readFile, rename, writeFile } from "node:fs/promises";
import { dirname, join } from "node:path";
import { Role } from "../../../gen/piccolo/common/v1/access.js";
import { invalidArgument } from "../errors.js";
import { unauthenticated } from "./tokens.js";

/** scrypt cost: N=2^15, r=8, p=1 (about 32 MiB and a few tens of ms per check). */
const N = 1 << 15;
const R = 8;
const P = 1;
const KEYLEN = 32;

interface UserRecord {
  hash: string;
  role: Role;
  failures: number;
  /** Epoch ms; 0 when not locked. */
  lockedUntil: number;
}

/** Lockout policy. */
export interface LockPolicy {
  /** Wrong passwords in a row that lock a user. */
  readonly maxFailures: number;
  /** How long a lock lasts, in ms. */
  readonly lockMs: number;
}

/** Users and their passwords. */
export interface UserStore {
  /** Checks a password; resolves to the user's role, or throws UNAUTHENTICATED (BAD_CREDENTIALS or ACCOUNT_LOCKED). */
  login(username: string, password: string): Promise<Role>;
  /** Sets a password (and role), creating the user; clears a lock. */
  setPassword(username: string, password: string, role: Role): Promise<Role>;
}

const USERNAME = /^[a-z][a-z0-9_-]{0,31}$/;

const derive = (password: string, salt: Buffer, n = N, r = R, p = P): Promise<Buffer> =>
  new Promise((resolve, reject) =>
    scrypt(password, salt, KEYLEN, { N: n, r, p, maxmem: 128 * n * r * 2 }, (err, key) => (err ? reject(err) : resolve(key))),
  );

async function hashPassword(password: string): Promise<string> {
  const salt = randomBytes(16);
  const key = await derive(password, salt);
  return `scrypt$${N}$${R}$${P}$${salt.toString("base64")}$${key.toString("base64")}`;
}

async function checkPassword(password: string, stored: string): Promise<boolean> {
  const [kind, n, r, p, salt, key] = stored.split("$");
  if (kind !== "scrypt" || !salt || !key) return false;
  const want = Buffer.from(key, "base64");
  const got = await derive(password, Buffer.from(salt, "base64"), Number(n), Number(r), Number(p));
  return got.length === want.length && timingSafeEqual(got, want);
}

/** Opens the user store. */
export async function openUserStore(o: { readonly stateDir: string; readonly policy: LockPolicy; readonly now?: () => number }): Promise<UserStore> {
  const file = join(o.stateDir, "auth", "users.json");
  const now = o.now ?? Date.now;
  let users: Record<string, UserRecord> = {};
  try {
    users = (JSON.parse(await readFile(file, "utf8")) as { users?: Record<string, UserRecord> }).users ?? {};
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== "ENOENT") throw e;
  }
  /** Failures of names that are not users; bounded so a flood cannot grow it without end. */
  const strangers = new Map<string, { failures: number; lockedUntil: number }>();
  // A hash to check unknown user names against (made on first need: scrypt is slow on purpose).
  let dummyHash: Promise<string> | undefined;
  let saving: Promise<void> = Promise.resolve();
  const save = (): Promise<void> => {
    saving = saving.then(async () => {
      await mkdir(dirname(file), { recursive: true, mode: 0o700 });
      const tmp = `${file}.${process.pid}.tmp`;
      await writeFile(tmp, JSON.stringify({ users }, null, 1) + "\n", { mode: 0o600 });
      await chmod(tmp, 0o600);
      await rename(tmp, file);
    });
    return saving;
  };
  // Serialise logins per user so concurrent guesses cannot overtake the failure count.
  const queues = new Map<string, Promise<unknown>>();
  const serial = <T>(key: string, fn: () => Promise<T>): Promise<T> => {
    const prev = queues.get(key) ?? Promise.resolve();
    const next = prev.then(fn, fn);
    const tail = next.catch(() => undefined);
    queues.set(key, tail);
    void tail.then(() => {
      if (queues.get(key) === tail) queues.delete(key);
    });
    return next;
  };

  const lockedError = (username: string, until: number): Error =>
    unauthenticated(
      `user ${username} is locked until ${new Date(until).toISOString()} after ${o.policy.maxFailures} wrong passwords in a row`,
      "ACCOUNT_LOCKED",
      { username, locked_until: new Date(until).toISOString() },
    );

  return {
    login(username, password) {
      return serial(username, async () => {
        const user = Object.hasOwn(users, username) ? users[username] : undefined;
        let state = user ?? strangers.get(username);
        if (!state) {
          if (strangers.size >= 10_000) strangers.delete(strangers.keys().next().value!);
          state = { failures: 0, lockedUntil: 0 };
          strangers.set(username, state);
        }
        if (state.lockedUntil > now()) throw lockedError(username, state.lockedUntil);
        const ok = await checkPassword(password, user?.hash ?? (await (dummyHash ??= hashPassword(randomBytes(16).toString("hex")))));
        if (ok && user) {
          if (user.failures !== 0 || user.lockedUntil !== 0) {
            user.failures = 0;
            user.lockedUntil = 0;
            await save();
          }
          return user.role;
        }
        state.failures++;
        if (state.failures >= o.policy.maxFailures) {
          state.failures = 0;
          state.lockedUntil = now() + o.policy.lockMs;
          if (user) await save();
          throw lockedError(username, state.lockedUntil);
        }
        if (user) await save();
        throw unauthenticated("wrong user name or password", "BAD_CREDENTIALS", { username });
      });
    },
    async setPassword(username, password, role) {
      if (!USERNAME.test(username)) throw invalidArgument("username", `expected 1-32 lower-case letters, digits, "_" or "-", starting with a letter, got ${JSON.stringify(username.slice(0, 40))}`);
      if ([...password].length < 8) throw invalidArgument("password", "must be at least 8 characters");
      if (password.length > 1024) throw invalidArgument("password", "must be at most 1024 characters");
      if (role !== Role.ROLE_UNSPECIFIED && role !== Role.ROLE_READER && role !== Role.ROLE_OPERATOR && role !== Role.ROLE_ADMIN) {
        throw invalidArgument("role", "must be ROLE_READER, ROLE_OPERATOR or ROLE_ADMIN");
      }
      const existing = Object.hasOwn(users, username) ? users[username] : undefined;
      const finalRole = role !== Role.ROLE_UNSPECIFIED ? role : (existing?.role ?? Role.ROLE_ADMIN);
      users[username] = { hash: await hashPassword(password), role: finalRole, failures: 0, lockedUntil: 0 };
      strangers.delete(username);
      await save();
      return finalRole;
    },
  };
}
