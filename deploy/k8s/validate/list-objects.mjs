// Prints one line per object of a multi-document YAML file, sorted: apiVersion, kind, name and a digest of
// its content with keys sorted. kustomize's hash suffix on generated ConfigMap names (and every reference to
// them) is removed first, so `kubectl kustomize` and `validate.mjs --render` output compare equal when they
// hold the same objects. Used by test-manifests.sh.
import fs from "node:fs";
import crypto from "node:crypto";
import YAML from "yaml";

const docs = YAML.parseAllDocuments(fs.readFileSync(process.argv[2], "utf8")).map((d) => d.toJS()).filter(Boolean);
const renamed = new Map();
for (const d of docs) {
  const m = d.kind === "ConfigMap" && /^(.*)-[a-z0-9]{10}$/.exec(d.metadata?.name ?? "");
  if (m) renamed.set(m[0], m[1]);
}
const canon = (v) =>
  Array.isArray(v) ? v.map(canon)
  : v && typeof v === "object" ? Object.fromEntries(Object.keys(v).sort().map((k) => [k, canon(v[k])]))
  : typeof v === "string" && renamed.has(v) ? renamed.get(v)
  : v;
const lines = docs.map((d) => {
  const c = canon(d);
  const digest = crypto.createHash("sha256").update(JSON.stringify(c)).digest("hex").slice(0, 16);
  return `${c.apiVersion} ${c.kind} ${c.metadata?.name} ${digest}`;
});
console.log(lines.sort().join("\n"));
