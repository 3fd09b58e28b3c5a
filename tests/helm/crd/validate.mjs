// Validates the CRD-based objects of a rendered chart against their CRDs' OpenAPI schemas
// (kubernetes-models generates a validator per CRD version from the upstream CRD files).
// Reads a JSON array of Kubernetes objects on stdin; prints one line per object checked and
// exits 1 if any fails, or if an object of a CRD kind has no validator here.
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";

const models = {
  "monitoring.coreos.com/v1/ServiceMonitor": ServiceMonitor,
  "keda.sh/v1alpha1/ScaledObject": ScaledObject,
};

let input = "";
for await (const chunk of process.stdin) input += chunk;
let failed = false;
for (const doc of JSON.parse(input)) {
  const key = `${doc.apiVersion}/${doc.kind}`;
  const name = `${key} ${doc.metadata?.name}`;
  const Model = models[key];
  if (!Model) {
    if (!doc.apiVersion.includes(".") || doc.apiVersion.includes(".k8s.io/")) continue;
    console.log(`${name}: no CRD schema here`);
    failed = true;
    continue;
  }
  try {
    new Model(doc).validate();
    console.log(`${name}: valid`);
  } catch (e) {
    console.log(`${name}: ${e.message}`);
    failed = true;
  }
}
process.exit(failed ? 1 : 0);
