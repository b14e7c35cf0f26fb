/** Jest: TypeScript through ts-jest as ES modules; unit tests beside the code, integration tests in test/. */
export default {
  testEnvironment: "node",
  extensionsToTreatAsEsm: [".ts"],
  moduleNameMapper: { "^(\\.{1,2}/.*)\\.js$": "$1" },
  transform: {
    "^.+\\.ts$": ["ts-jest", { useESM: true, tsconfig: "tsconfig.json", isolatedModules: true, diagnostics: false }],
  },
  testMatch: ["<rootDir>/src/**/*.test.ts", "<rootDir>/test/**/*.test.ts", "<rootDir>/tools/**/*.test.ts"],
  testTimeout: 120000,
  // Integration tests start real daemons; two at a time keeps a 2-core machine responsive.
  maxWorkers: 2,
};
