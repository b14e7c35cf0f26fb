#!/usr/bin/env bash
# Bundles the REST client SDK for browsers (dist/browser/piccolo-rest.js, an IIFE exposing the
# global PiccoloRest, and piccolo-rest.mjs as an ES module). Fails if anything needs Node.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p dist/browser
common=(src/clients/browser/index.ts --bundle --platform=browser --target=es2022 --minify
  --alias:@grpc/grpc-js=./src/clients/browser/grpc-js-stub.ts --log-level=warning)
node_modules/.bin/esbuild "${common[@]}" --format=iife --global-name=PiccoloRest --outfile=dist/browser/piccolo-rest.js
node_modules/.bin/esbuild "${common[@]}" --format=esm --outfile=dist/browser/piccolo-rest.mjs
