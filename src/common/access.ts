/**
 * The role each RPC needs, read from its `(piccolo.common.v1.min_role)` method option in the
 * embedded descriptors: the proto declares access, this reads it, the auth interceptor enforces it.
 */
import { getExtension, hasExtension, type DescExtension, type DescMethod } from "@bufbuild/protobuf";
import { Role } from "../../gen/piccolo/common/v1/access.js";
import { apiRegistry } from "./proto-registry.js";

const minRoleExt = apiRegistry.getExtension("piccolo.common.v1.min_role") as DescExtension | undefined;
if (!minRoleExt) throw new Error("the embedded descriptors lack piccolo.common.v1.min_role; run npm run generate");

/** The role an RPC declares; ROLE_UNSPECIFIED when it declares none. */
export function declaredRole(method: DescMethod): Role {
  const opts = method.proto.options;
  if (!opts || !hasExtension(opts, minRoleExt!)) return Role.ROLE_UNSPECIFIED;
  return getExtension(opts, minRoleExt!) as Role;
}

/** Every RPC of the piccolod API (services in the piccolo.* packages), by "/pkg.Service/Method" path. */
export function apiMethods(): Map<string, DescMethod> {
  const out = new Map<string, DescMethod>();
  for (const file of apiRegistry.files) {
    if (!file.proto.package.startsWith("piccolo.")) continue;
    for (const svc of file.services) {
      for (const m of svc.methods) out.set(`/${svc.typeName}/${m.name}`, m);
    }
  }
  return out;
}

/** Whether `have` includes `need` (ADMIN ⊇ OPERATOR ⊇ READER ⊇ PUBLIC); UNSPECIFIED needs the unix socket. */
export function roleAllows(have: Role, need: Role): boolean {
  if (need === Role.ROLE_UNSPECIFIED) return false;
  return have >= need;
}
