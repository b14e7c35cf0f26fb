/**
 * Stands in for @grpc/grpc-js in the browser bundle of the REST clients. The generated message
 * modules also hold the grpc-js service definitions and client constructors, which a browser
 * never uses; this stub lets them load without pulling Node's http2 into the bundle.
 */

/** Returns a constructor that refuses to be used: gRPC needs Node; browsers use the REST clients. */
export function makeGenericClientConstructor(): new () => never {
  return class {
    constructor() {
      throw new Error("gRPC clients need Node.js; in a browser use the REST clients (createRestClients)");
    }
  } as unknown as new () => never;
}

/** Unused in browsers; present so imports resolve. */
export class Client {}
