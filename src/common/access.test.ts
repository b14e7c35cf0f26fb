import { Role } from "../../gen/piccolo/common/v1/access.js";
import { apiMethods, declaredRole, roleAllows } from "./access.js";

describe("RPC roles declared in the proto", () => {
  it("every piccolod RPC declares (piccolo.common.v1.min_role)", () => {
    const methods = apiMethods();
    expect(methods.size).toBeGreaterThan(20);
    const missing = [...methods].filter(([, m]) => declaredRole(m) === Role.ROLE_UNSPECIFIED).map(([p]) => p);
    expect(missing).toEqual([]);
  });

  it("reads the declared roles", () => {
    const methods = apiMethods();
    expect(declaredRole(methods.get("/piccolo.system.v1.SystemService/GetHealth")!)).toBe(Role.ROLE_PUBLIC);
    expect(declaredRole(methods.get("/piccolo.system.v1.SystemService/GetVersion")!)).toBe(Role.ROLE_READER);
    expect(declaredRole(methods.get("/piccolo.containers.v1.ContainerService/CreateContainer")!)).toBe(Role.ROLE_OPERATOR);
  });

  it("orders roles", () => {
    expect(roleAllows(Role.ROLE_ADMIN, Role.ROLE_OPERATOR)).toBe(true);
    expect(roleAllows(Role.ROLE_READER, Role.ROLE_OPERATOR)).toBe(false);
    expect(roleAllows(Role.ROLE_READER, Role.ROLE_PUBLIC)).toBe(true);
    expect(roleAllows(Role.ROLE_ADMIN, Role.ROLE_UNSPECIFIED)).toBe(false);
  });
});
