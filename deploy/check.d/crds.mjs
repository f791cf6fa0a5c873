// Validates the custom resources in a multi-document YAML file against the
// schemas of their CRDs (kubernetes-validate ships core Kubernetes only).
// Usage: node crds.mjs MANIFESTS.yaml   (run from the npm install directory)
// Prints one line per custom resource; exits 1 if any fails or has no schema.
import fs from "node:fs";
import path from "node:path";
import { createRequire } from "node:module";
import { pathToFileURL } from "node:url";

const require = createRequire(path.join(process.cwd(), "package.json"));
const yaml = require("js-yaml");

// apiVersion/kind -> module exporting the model class (its validate() runs
// the CRD's OpenAPI schema).
const MODELS = {
  "monitoring.coreos.com/v1/ServiceMonitor":
    "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor",
  "monitoring.coreos.com/v1/PodMonitor":
    "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor",
  "monitoring.coreos.com/v1/PrometheusRule":
    "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule",
  "cert-manager.io/v1/Certificate":
    "@kubernetes-models/cert-manager/cert-manager.io/v1/Certificate",
};
const CORE = /^(v1|(apps|batch|policy|autoscaling|networking\.k8s\.io|rbac\.authorization\.k8s\.io|storage\.k8s\.io)\/[^/]+)$/;

let failed = false;
for (const doc of yaml.loadAll(fs.readFileSync(process.argv[2], "utf8"))) {
  if (!doc || CORE.test(doc.apiVersion)) continue;
  const id = `${doc.apiVersion}/${doc.kind}`;
  const name = `${doc.kind.toLowerCase()}/${doc.metadata?.name}`;
  const mod = MODELS[id];
  if (!mod) {
    console.log(`${name}: no schema known for ${id}`);
    failed = true;
    continue;
  }
  const file = path.join(process.cwd(), "node_modules", `${mod}.js`);
  const cls = (await import(pathToFileURL(file).href))[doc.kind];
  try {
    new cls(doc).validate();
    console.log(`${name}: valid (${id})`);
  } catch (e) {
    console.log(`${name}: ${e.message}`);
    failed = true;
  }
}
process.exit(failed ? 1 : 0);
