/**
 * Entry of the single executable that ships on Flatcar: one binary serves as the daemon and the
 * CLI, chosen by the name it was started as (`piccolod`, or `piccoloctl` through a symlink),
 * so the sysext carries one copy of the Node runtime.
 */
import { basename } from "node:path";

const name = basename(process.argv0 || process.argv[0] || "");
if (name.startsWith("piccoloctl")) void import("./clients/cli/main.js");
else void import("./server/main.js");
