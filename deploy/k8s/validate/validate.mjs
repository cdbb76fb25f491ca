// Validates rendered Kubernetes manifests (multi-document YAML) against the Kubernetes schemas.
//
//   node validate.mjs [--expect KIND,KIND...] FILE...      validate; exit 1 naming every problem
//   node validate.mjs --render DIR                          print DIR's kustomization without kustomize
//
// Each object goes through three checks:
//  1. schema: the kubernetes-models class of its apiVersion/kind (apps/v1 Deployment, v1 Service, ...;
//     monitoring.coreos.com/v1 ServiceMonitor and PrometheusRule from @kubernetes-models/prometheus-operator)
//     and its .validate(), the Kubernetes OpenAPI schema compiled with ajv: types, required fields, enums,
//     formats.
//     An apiVersion/kind without a model is an error.
//  2. unknown fields: the schemas as kubernetes-models compiles them allow additional properties, so a
//     misspelt field (readOnlyRootFileSystem) would pass 1 and be dropped by the API server. The object is
//     therefore also type-checked, as a TypeScript object literal, against the model's own interface
//     (IDeployment, ...), where every property not in the schema is an excess-property error and every
//     wrong scalar type a type error. Errors name the object's field path.
//  3. references between the objects: Service, PodDisruptionBudget, NetworkPolicy and ServiceMonitor
//     selectors match pods or Services of the set, named target ports (and a NetworkPolicy's named ports)
//     exist, the HPA's target and the ConfigMaps that volumes name are in the set, and a pod's
//     terminationGracePeriodSeconds exceeds its preStop pause plus the server's --shutdown-grace. And the
//     server's files and probes: every file a flag names (--config, --*-file, ATTNSERVE_*_FILE) lies under a
//     volumeMount, no Secret or ConfigMap is mounted with subPath (its updates would never reach the pod), and
//     with TLS on (--tls-cert-file) no kubelet gRPC probe targets the TLS port (the kubelet cannot do TLS).
//
// --render is the fallback for machines without kubectl: it prints the resources a kustomization lists
// (files, directories with their own kustomization, components, and configMapGenerator entries with
// generatorOptions' labels, without kustomize's name hash), applies `patches` that are JSON 6902 operation
// lists with a group/version/kind/name target (as kustomize: every object the target selects, none is not an
// error), and refuses any other kustomize feature (strategic-merge patches among them), so its output has the
// same objects as `kubectl kustomize` (test-manifests.sh compares them where kubectl runs).
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import YAML from "yaml";
import ts from "typescript";

const here = path.dirname(fileURLToPath(import.meta.url));

// ---- models -------------------------------------------------------------------------------------------------
// apiVersion/kind -> module of the model (its class is exported under the kind's name, its interface as I<kind>).
function modelModule(apiVersion, kind) {
  if (typeof apiVersion !== "string" || typeof kind !== "string" || !/^[A-Za-z0-9]+$/.test(kind)) return null;
  const [group, version] = apiVersion.includes("/") ? apiVersion.split("/") : ["", apiVersion];
  if (group === "monitoring.coreos.com") return `@kubernetes-models/prometheus-operator/${group}/${version}/${kind}`;
  return group ? `kubernetes-models/${group}/${version}/${kind}` : `kubernetes-models/${version}/${kind}`;
}

async function loadModel(apiVersion, kind) {
  const mod = modelModule(apiVersion, kind);
  if (!mod) return null;
  try {
    const m = await import(mod);
    return m[kind] ? { mod, cls: m[kind] } : null;
  } catch {
    return null;
  }
}

// ---- 1. schema ------------------------------------------------------------------------------------------------
function schemaErrors(cls, obj) {
  try {
    new cls(obj).validate();
    return [];
  } catch (e) {
    if (Array.isArray(e.errors)) {
      return e.errors.map((x) => {
        const where = (x.instancePath || "").replace(/\/(\d+)(?=\/|$)/g, "[$1]").replace(/^\//, "").replace(/\//g, ".") || "(object)";
        const extra = x.params && x.params.allowedValues ? ` (${x.params.allowedValues.join(", ")})` : "";
        return `${where}: ${x.message}${extra}`;
      });
    }
    return [String(e.message || e)];
  }
}

// ---- 2. unknown fields and types: the objects as TypeScript literals of the models' interfaces ----------------
// Writes `value` as a TypeScript expression, one line per field, recording each line's field path, so that a
// diagnostic's line names the field.
function emit(value, fieldPath, indent, prefix, suffix, out) {
  const pad = "  ".repeat(indent);
  const isArray = Array.isArray(value);
  const isObject = value !== null && typeof value === "object";
  const entries = isArray ? value.map((v, i) => [i, v]) : isObject ? Object.entries(value) : [];
  if (entries.length === 0) {
    out.push({ text: `${pad}${prefix}${JSON.stringify(value === undefined ? null : value)}${suffix}`, path: fieldPath });
    return;
  }
  out.push({ text: `${pad}${prefix}${isArray ? "[" : "{"}`, path: fieldPath });
  entries.forEach(([k, v], i) => {
    const p = isArray ? `${fieldPath}[${k}]` : fieldPath ? `${fieldPath}.${k}` : k;
    emit(v, p, indent + 1, isArray ? "" : `${JSON.stringify(k)}: `, i + 1 < entries.length ? "," : "", out);
  });
  out.push({ text: `${pad}${isArray ? "]" : "}"}${suffix}`, path: fieldPath });
}

// The source: one typed constant per object, and its line -> (object, field path) table.
function toSource(objects) {
  const lines = [];
  objects.forEach((o, n) => lines.push({ text: `import type { I${o.kind} as T${n} } from ${JSON.stringify(o.mod)};`, path: "", doc: -1 }));
  objects.forEach((o, n) => {
    const out = [];
    emit(o.obj, "", 0, `export const doc${n}: T${n} = `, ";", out);
    for (const l of out) lines.push({ ...l, doc: n });
  });
  return { source: lines.map((l) => l.text).join("\n") + "\n", lines };
}

function typeErrors(objects) {
  if (objects.length === 0) return new Map();
  const { source, lines } = toSource(objects);
  const fileName = path.join(here, "__manifests__.ts");
  const options = {
    strict: true,
    noEmit: true,
    skipLibCheck: true,
    types: [],
    target: ts.ScriptTarget.ES2020,
    module: ts.ModuleKind.CommonJS,
    moduleResolution: ts.ModuleResolutionKind.Node10,
  };
  const host = ts.createCompilerHost(options, true);
  const getSourceFile = host.getSourceFile.bind(host);
  host.getSourceFile = (name, lang, ...rest) =>
    path.resolve(name) === fileName ? ts.createSourceFile(name, source, lang, true) : getSourceFile(name, lang, ...rest);
  const fileExists = host.fileExists.bind(host);
  host.fileExists = (name) => path.resolve(name) === fileName || fileExists(name);
  const readFile = host.readFile.bind(host);
  host.readFile = (name) => (path.resolve(name) === fileName ? source : readFile(name));
  const program = ts.createProgram([fileName], options, host);
  const byDoc = new Map();
  for (const d of ts.getPreEmitDiagnostics(program)) {
    const msg = ts.flattenDiagnosticMessageText(d.messageText, " ");
    if (!d.file || path.resolve(d.file.fileName) !== fileName) {
      throw new Error(`TypeScript check failed outside the manifests: ${msg}`);
    }
    const { line } = d.file.getLineAndCharacterOfPosition(d.start ?? 0);
    const l = lines[line];
    if (!l || l.doc < 0) throw new Error(`TypeScript: ${msg}`);
    if (!byDoc.has(l.doc)) byDoc.set(l.doc, []);
    const unknown = /may only specify known properties, and '"?([^'"]+)"?' does not exist in type '([^']+)'/.exec(msg);
    byDoc.get(l.doc).push(
      unknown
        ? `${l.path || "(object)"}: unknown field "${unknown[1]}" (not in ${unknown[2].length > 60 ? "the schema" : unknown[2]})`
        : `${l.path || "(object)"}: ${msg}`,
    );
  }
  return byDoc;
}

// ---- 3. references between the objects ------------------------------------------------------------------------
const matches = (selector, labels) =>
  selector && Object.keys(selector).length > 0 && Object.entries(selector).every(([k, v]) => (labels || {})[k] === v);

function podTemplates(objects) {
  return objects
    .filter((o) => ["Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"].includes(o.obj.kind))
    .map((o) => ({ owner: o, template: o.obj.spec?.template ?? {} }));
}

function shutdownGraceSeconds(args) {
  for (const a of args || []) {
    const m = /^--shutdown-grace=(\d+(?:\.\d+)?)(ms|s|m)?$/.exec(a);
    if (m) return Number(m[1]) * ({ ms: 0.001, s: 1, m: 60 }[m[2] || "s"]);
  }
  return 30; // the server's default
}

// The server's flags a container sets, as name -> value: its args (--name=value or --name value) and the
// ATTNSERVE_* variables (ATTNSERVE_TLS_CERT_FILE is --tls-cert-file); args win, as in the server.
function serverFlags(c) {
  const flags = new Map();
  for (const e of c.env ?? []) {
    const m = /^ATTNSERVE_([A-Z0-9_]+)$/.exec(e.name ?? "");
    if (m && typeof e.value === "string") flags.set(m[1].toLowerCase().replace(/_/g, "-"), e.value);
  }
  const args = c.args ?? [];
  for (let i = 0; i < args.length; i++) {
    const m = /^--([a-z0-9-]+)(?:=(.*))?$/.exec(args[i]);
    if (!m) continue;
    if (m[2] !== undefined) flags.set(m[1], m[2]);
    else if (i + 1 < args.length && !args[i + 1].startsWith("--")) flags.set(m[1], args[++i]);
    else flags.set(m[1], "");
  }
  return flags;
}

const addressPort = (address) => {
  const m = /:(\d+)$/.exec(address ?? "");
  return m ? Number(m[1]) : null;
};

function referenceErrors(objects) {
  const errs = [];
  const err = (o, msg) => errs.push(`${o.obj.kind}/${o.obj.metadata?.name}: ${msg}`);
  const templates = podTemplates(objects);
  const configMaps = new Set(objects.filter((o) => o.obj.kind === "ConfigMap").map((o) => o.obj.metadata?.name));
  for (const { owner, template } of templates) {
    const sel = owner.obj.spec?.selector?.matchLabels;
    if (!matches(sel, template.metadata?.labels)) err(owner, "spec.selector.matchLabels do not match the pod template's labels");
    const spec = template.spec ?? {};
    for (const v of spec.volumes ?? []) {
      if (v.configMap && !v.configMap.optional && !configMaps.has(v.configMap.name)) {
        err(owner, `volume ${v.name}: ConfigMap ${v.configMap.name} is not in the manifests`);
      }
    }
    for (const c of spec.containers ?? []) {
      const mounts = new Set((spec.volumes ?? []).map((v) => v.name));
      for (const m of c.volumeMounts ?? []) if (!mounts.has(m.name)) err(owner, `container ${c.name}: volumeMount ${m.name} has no volume`);
      const pre = c.lifecycle?.preStop;
      const pause = pre?.sleep?.seconds ?? (pre?.exec?.command && /sleep$/.test(pre.exec.command[0]) ? Number(pre.exec.command[1]) : 0);
      // The server's drain only (another container, e.g. the session proxy's nginx, has no --shutdown-grace).
      const isServer = c.name === "attnserve" || /(^|\/)attnserve[:@]/.test(c.image ?? "");
      const need = pause + shutdownGraceSeconds(c.args);
      const grace = spec.terminationGracePeriodSeconds ?? 30;
      if (isServer && !(grace > need)) {
        err(owner, `container ${c.name}: terminationGracePeriodSeconds ${grace} must exceed the preStop pause (${pause} s) plus --shutdown-grace (${need - pause} s)`);
      }
      const ports = new Set((c.ports ?? []).map((p) => p.containerPort));
      const flags = serverFlags(c);
      const tlsPort = flags.has("tls-cert-file") ? addressPort(flags.get("grpc-address")) ?? 50051 : null;
      for (const probe of ["startupProbe", "readinessProbe", "livenessProbe"]) {
        const p = c[probe];
        if (p?.grpc && !ports.has(p.grpc.port)) err(owner, `container ${c.name}: ${probe} port ${p.grpc.port} is not a containerPort`);
        if (p?.grpc && p.grpc.port === tlsPort) {
          err(owner, `container ${c.name}: ${probe} is a gRPC probe on the TLS port ${tlsPort}: the kubelet's gRPC probe cannot do TLS (probe a plaintext --health-address port)`);
        }
      }
      const volumes = new Map((spec.volumes ?? []).map((v) => [v.name, v]));
      for (const m of c.volumeMounts ?? []) {
        const v = volumes.get(m.name);
        const source = v && (v.secret ? "Secret" : v.configMap ? "ConfigMap" : v.projected ? "projected" : null);
        if (source && (m.subPath || m.subPathExpr)) {
          err(owner, `container ${c.name}: volumeMount ${m.name} (${source}) uses subPath: updates of the ${source} never reach a subPath mount; mount the directory`);
        }
      }
      for (const [flag, file] of flags) {
        if (!(flag === "config" || flag.endsWith("-file")) || !file.startsWith("/")) continue;
        const under = (c.volumeMounts ?? []).some((m) => (m.subPath || m.subPathExpr ? file === m.mountPath : file.startsWith(`${m.mountPath.replace(/\/+$/, "")}/`)));
        if (!under) err(owner, `container ${c.name}: --${flag} ${file} is not under any volumeMount of the container`);
      }
    }
  }
  const portNames = (template) => new Set((template.spec?.containers ?? []).flatMap((c) => (c.ports ?? []).map((p) => p.name)));
  for (const o of objects.filter((x) => x.obj.kind === "Service")) {
    const sel = o.obj.spec?.selector;
    const hits = templates.filter((t) => matches(sel, t.template.metadata?.labels));
    if (hits.length === 0) { err(o, "spec.selector matches no pod template in the manifests"); continue; }
    for (const p of o.obj.spec?.ports ?? []) {
      if (typeof p.targetPort === "string" && !hits.every((t) => portNames(t.template).has(p.targetPort))) {
        err(o, `port ${p.name}: targetPort ${p.targetPort} is not a named container port of the selected pods`);
      }
    }
  }
  for (const o of objects.filter((x) => x.obj.kind === "NetworkPolicy")) {
    const sel = o.obj.spec?.podSelector ?? {};
    if (sel.matchExpressions) continue; // not evaluated here
    // An empty podSelector selects every pod of the namespace.
    const hits = Object.keys(sel.matchLabels ?? {}).length === 0 ? templates
      : templates.filter((t) => matches(sel.matchLabels, t.template.metadata?.labels));
    if (hits.length === 0) { err(o, "spec.podSelector matches no pod template in the manifests"); continue; }
    (o.obj.spec?.ingress ?? []).forEach((rule, i) => {
      for (const p of rule.ports ?? []) {
        if (typeof p.port === "string" && !hits.every((t) => portNames(t.template).has(p.port))) {
          err(o, `ingress[${i}]: port ${p.port} is not a named container port of the selected pods`);
        }
      }
    });
  }
  for (const o of objects.filter((x) => x.obj.kind === "PodDisruptionBudget")) {
    if (!templates.some((t) => matches(o.obj.spec?.selector?.matchLabels, t.template.metadata?.labels))) {
      err(o, "spec.selector matches no pod template in the manifests");
    }
  }
  for (const o of objects.filter((x) => x.obj.kind === "HorizontalPodAutoscaler")) {
    const ref = o.obj.spec?.scaleTargetRef ?? {};
    if (!objects.some((t) => t.obj.kind === ref.kind && t.obj.apiVersion === ref.apiVersion && t.obj.metadata?.name === ref.name)) {
      err(o, `scaleTargetRef ${ref.apiVersion} ${ref.kind}/${ref.name} is not in the manifests`);
    }
    if ((o.obj.spec?.minReplicas ?? 1) > o.obj.spec?.maxReplicas) err(o, "minReplicas exceeds maxReplicas");
  }
  for (const o of objects.filter((x) => x.obj.kind === "ServiceMonitor")) {
    const services = objects.filter((s) => s.obj.kind === "Service" && matches(o.obj.spec?.selector?.matchLabels, s.obj.metadata?.labels));
    if (services.length === 0) { err(o, "spec.selector matches no Service in the manifests"); continue; }
    for (const e of o.obj.spec?.endpoints ?? []) {
      if (e.port && !services.every((s) => (s.obj.spec?.ports ?? []).some((p) => p.name === e.port))) {
        err(o, `endpoint port ${e.port} is not a port name of the selected Services`);
      }
    }
  }
  return errs;
}

// ---- the fallback renderer ----------------------------------------------------------------------------------
// kustomize's order within one kustomization (or component): its resources, then its components (each adds
// its resources to, and patches, what has been accumulated so far), then its generators, then its patches.
// A resource directory is rendered on its own; a component works on its parent's objects.
const KNOWN_KUSTOMIZATION_KEYS = new Set(["apiVersion", "kind", "resources", "components", "configMapGenerator", "generatorOptions", "patches"]);

function renderDir(dir, docs, asComponent = false) {
  const file = ["kustomization.yaml", "kustomization.yml", "Kustomization"].map((f) => path.join(dir, f)).find((f) => fs.existsSync(f));
  if (!file) throw new Error(`${dir}: no kustomization.yaml`);
  const k = YAML.parse(fs.readFileSync(file, "utf8")) ?? {};
  for (const key of Object.keys(k)) {
    if (!KNOWN_KUSTOMIZATION_KEYS.has(key)) throw new Error(`${file}: '${key}' needs kustomize (kubectl kustomize); --render lists resources and applies JSON 6902 patches`);
  }
  const kind = k.kind ?? "Kustomization";
  if (asComponent && kind !== "Component") throw new Error(`${file}: listed under components, but its kind is ${kind}, not Component`);
  if (!asComponent && kind !== "Kustomization") throw new Error(`${file}: kind ${kind} where a Kustomization is expected (a Component goes under components)`);
  for (const r of k.resources ?? []) {
    const p = path.resolve(dir, r);
    if (fs.statSync(p).isDirectory()) docs.push(...renderDir(p, []));
    else for (const d of YAML.parseAllDocuments(fs.readFileSync(p, "utf8"))) if (d.contents) docs.push(d.toJS());
  }
  for (const c of k.components ?? []) {
    const p = path.resolve(dir, c);
    if (!fs.statSync(p).isDirectory()) throw new Error(`${file}: component ${c} is not a directory`);
    renderDir(p, docs, true);
  }
  for (const g of k.configMapGenerator ?? []) {
    const data = {};
    for (const f of g.files ?? []) {
      const [key, rel] = f.includes("=") ? f.split("=", 2) : [path.basename(f), f];
      data[key] = fs.readFileSync(path.resolve(dir, rel), "utf8");
    }
    for (const l of g.literals ?? []) { const i = l.indexOf("="); data[l.slice(0, i)] = l.slice(i + 1); }
    const metadata = { name: g.name };
    const labels = { ...k.generatorOptions?.labels, ...g.options?.labels };
    const annotations = { ...k.generatorOptions?.annotations, ...g.options?.annotations };
    if (Object.keys(labels).length) metadata.labels = labels;
    if (Object.keys(annotations).length) metadata.annotations = annotations;
    docs.push({ apiVersion: "v1", kind: "ConfigMap", metadata, data });
  }
  (k.patches ?? []).forEach((p, i) => applyPatch(`${file}: patches[${i}]`, dir, p, docs));
  return docs;
}

// One `patches` entry: JSON 6902 operations (a YAML or JSON list) from `path` or inline `patch`, applied to
// every object its target selects (group, version and kind exact; name an anchored regular expression, as in
// kustomize). Strategic-merge patches (a YAML object) and other selectors need kustomize.
function applyPatch(where, dir, p, docs) {
  const needsKustomize = (what) => new Error(`${where}: ${what} needs kustomize (kubectl kustomize); --render applies JSON 6902 patches with a group/version/kind/name target`);
  for (const key of Object.keys(p ?? {})) if (!["path", "patch", "target"].includes(key)) throw needsKustomize(`'${key}'`);
  if ((p.path === undefined) === (p.patch === undefined)) throw new Error(`${where}: needs exactly one of path and patch`);
  const text = p.path !== undefined ? fs.readFileSync(path.resolve(dir, p.path), "utf8") : p.patch;
  const ops = YAML.parse(text);
  if (!Array.isArray(ops)) throw needsKustomize("a strategic-merge patch");
  if (!p.target) throw new Error(`${where}: a JSON 6902 patch needs a target`);
  for (const key of Object.keys(p.target)) if (!["group", "version", "kind", "name"].includes(key)) throw needsKustomize(`target.${key}`);
  const t = p.target;
  docs.forEach((d, n) => {
    const [group, version] = String(d.apiVersion ?? "").includes("/") ? d.apiVersion.split("/") : ["", d.apiVersion];
    if (t.group !== undefined && t.group !== group) return;
    if (t.version !== undefined && t.version !== version) return;
    if (t.kind !== undefined && t.kind !== d.kind) return;
    if (t.name !== undefined && !new RegExp(`^(?:${t.name})$`).test(d.metadata?.name ?? "")) return;
    docs[n] = jsonPatch(d, ops, `${where} on ${d.kind}/${d.metadata?.name}`);
  });
}

// RFC 6902 on a copy of doc: add, remove, replace, move, copy, test; any failure is an error (as in kustomize).
function jsonPatch(doc, ops, where) {
  const root = { doc: structuredClone(doc) };
  const parse = (pointer, i) => {
    if (typeof pointer !== "string" || (pointer !== "" && !pointer.startsWith("/"))) throw new Error(`${where}: operation ${i}: bad path ${JSON.stringify(pointer)}`);
    return ["doc", ...(pointer === "" ? [] : pointer.slice(1).split("/").map((s) => s.replace(/~1/g, "/").replace(/~0/g, "~")))];
  };
  // The container of the last token, and that token (an array index as a number, or "-").
  const locate = (tokens, i, forAdd) => {
    let cur = root;
    for (const tok of tokens.slice(0, -1)) {
      const next = Array.isArray(cur) ? cur[arrayIndex(cur, tok, i, false)] : cur !== null && typeof cur === "object" && Object.hasOwn(cur, tok) ? cur[tok] : undefined;
      if (next === undefined) throw new Error(`${where}: operation ${i}: path ${tokens.slice(1).join("/")}: ${tok} does not exist`);
      cur = next;
    }
    const last = tokens[tokens.length - 1];
    if (cur === null || typeof cur !== "object") throw new Error(`${where}: operation ${i}: the parent of ${last} is not an object or array`);
    return [cur, Array.isArray(cur) ? arrayIndex(cur, last, i, forAdd) : last];
  };
  const arrayIndex = (arr, tok, i, forAdd) => {
    if (forAdd && tok === "-") return arr.length;
    if (!/^(0|[1-9]\d*)$/.test(tok) || Number(tok) > arr.length - (forAdd ? 0 : 1)) throw new Error(`${where}: operation ${i}: index ${tok} is out of range`);
    return Number(tok);
  };
  const get = (tokens, i) => {
    const [c, k] = locate(tokens, i, false);
    if (!Array.isArray(c) && !Object.hasOwn(c, k)) throw new Error(`${where}: operation ${i}: ${tokens.slice(1).join("/")} does not exist`);
    return c[k];
  };
  const add = (tokens, value, i) => {
    const [c, k] = locate(tokens, i, true);
    if (Array.isArray(c)) c.splice(k, 0, value); else c[k] = value;
  };
  const remove = (tokens, i) => {
    const [c, k] = locate(tokens, i, false);
    if (Array.isArray(c)) c.splice(k, 1);
    else if (Object.hasOwn(c, k)) delete c[k];
    else throw new Error(`${where}: operation ${i}: ${tokens.slice(1).join("/")} does not exist`);
  };
  const equal = (a, b) => JSON.stringify(canonical(a)) === JSON.stringify(canonical(b));
  ops.forEach((op, i) => {
    const tokens = parse(op?.path, i);
    if (tokens.length === 1 && op.op !== "test") throw new Error(`${where}: operation ${i}: --render does not replace a whole object`);
    switch (op?.op) {
      case "add": add(tokens, structuredClone(op.value), i); break;
      case "remove": remove(tokens, i); break;
      case "replace": get(tokens, i); remove(tokens, i); add(tokens, structuredClone(op.value), i); break;
      case "move": { const from = parse(op.from, i); const v = get(from, i); remove(from, i); add(tokens, v, i); break; }
      case "copy": add(tokens, structuredClone(get(parse(op.from, i), i)), i); break;
      case "test":
        if (!equal(get(tokens, i), op.value)) throw new Error(`${where}: operation ${i}: test failed: ${op.path} is ${JSON.stringify(get(tokens, i))}, not ${JSON.stringify(op.value)}`);
        break;
      default: throw new Error(`${where}: operation ${i}: unknown op ${JSON.stringify(op?.op)}`);
    }
  });
  return root.doc;
}

const canonical = (v) =>
  Array.isArray(v) ? v.map(canonical)
  : v && typeof v === "object" ? Object.fromEntries(Object.keys(v).sort().map((k) => [k, canonical(v[k])]))
  : v;

// ---- main ---------------------------------------------------------------------------------------------------
async function main(argv) {
  if (argv[0] === "--render") {
    if (argv.length !== 2) throw new Error("usage: validate.mjs --render DIR");
    process.stdout.write(renderDir(path.resolve(argv[1]), []).map((d) => YAML.stringify(d)).join("---\n"));
    return 0;
  }
  let expect = [];
  const files = [];
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--expect") expect = argv[++i].split(",").filter(Boolean);
    else files.push(argv[i]);
  }
  if (files.length === 0) throw new Error("usage: validate.mjs [--expect KIND,...] FILE... | --render DIR");

  const problems = [];
  const objects = [];
  for (const f of files) {
    const text = fs.readFileSync(f === "-" ? 0 : f, "utf8");
    const parsed = YAML.parseAllDocuments(text, { prettyErrors: true, uniqueKeys: true });
    parsed.forEach((d, i) => {
      if (d.errors.length) { problems.push(`${f}: document ${i + 1}: ${d.errors.map((e) => e.message).join("; ")}`); return; }
      const obj = d.toJS();
      if (obj == null) return;
      if (typeof obj !== "object" || Array.isArray(obj)) { problems.push(`${f}: document ${i + 1}: not an object`); return; }
      objects.push({ file: f, obj });
    });
  }
  const checked = [];
  for (const o of objects) {
    const id = `${o.file}: ${o.obj.apiVersion} ${o.obj.kind}/${o.obj.metadata?.name ?? "?"}`;
    const model = await loadModel(o.obj.apiVersion, o.obj.kind);
    if (!model) { problems.push(`${id}: no schema for apiVersion ${o.obj.apiVersion} kind ${o.obj.kind}`); continue; }
    o.id = id;
    o.mod = model.mod;
    o.kind = o.obj.kind;
    for (const e of schemaErrors(model.cls, o.obj)) problems.push(`${id}: schema: ${e}`);
    checked.push(o);
  }
  const strict = typeErrors(checked);
  checked.forEach((o, n) => { for (const e of strict.get(n) ?? []) problems.push(`${o.id}: strict: ${e}`); });
  for (const e of referenceErrors(checked)) problems.push(`references: ${e}`);
  const kinds = checked.map((o) => o.obj.kind);
  for (const k of expect) if (!kinds.includes(k)) problems.push(`missing: no ${k} in the manifests`);

  for (const o of checked) console.log(`${problems.some((p) => p.startsWith(`${o.id}:`)) ? "FAIL" : "ok"}: ${o.id}`);
  if (problems.length) {
    for (const p of problems) console.error(`error: ${p}`);
    console.error(`${problems.length} problem(s) in ${objects.length} object(s)`);
    return 1;
  }
  console.log(`${checked.length} object(s) valid: ${kinds.join(", ")}`);
  return 0;
}

main(process.argv.slice(2)).then(
  (rc) => process.exit(rc),
  (e) => { console.error(`validate.mjs: ${e.message}`); process.exit(2); },
);
