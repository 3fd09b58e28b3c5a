{{/* Names, labels and the pieces every role's pod shares. */}}

{{- define "baton.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "baton.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "baton.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "baton.labels" -}}
helm.sh/chart: {{ include "baton.chart" . }}
{{ include "baton.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: baton
{{- end -}}

{{- define "baton.selectorLabels" -}}
app.kubernetes.io/name: {{ include "baton.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Selector labels of one role; call with (dict "root" $ "role" "prefill"). */}}
{{- define "baton.roleSelector" -}}
{{ include "baton.selectorLabels" .root }}
app.kubernetes.io/component: {{ .role }}
{{- end -}}

{{- define "baton.roleLabels" -}}
{{ include "baton.labels" .root }}
app.kubernetes.io/component: {{ .role }}
{{- end -}}

{{- define "baton.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "baton.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The image of a role: (dict "root" $ "profile" "cpu"|"gpu"). */}}
{{- define "baton.image" -}}
{{- $tag := default .root.Chart.AppVersion .root.Values.image.tag -}}
{{- if eq .profile "gpu" -}}
{{- $tag = printf "%s%s" $tag .root.Values.image.cudaTagSuffix -}}
{{- end -}}
{{- printf "%s:%s" .root.Values.image.repository $tag -}}
{{- end -}}

{{/* etcd client URLs: the bundled server's, else the external list. */}}
{{- define "baton.etcdEndpoints" -}}
{{- if .Values.etcd.bundled.enabled -}}
{{- list (printf "http://%s-etcd:2379" (include "baton.fullname" .)) | toJson -}}
{{- else -}}
{{- .Values.etcd.endpoints | toJson -}}
{{- end -}}
{{- end -}}

{{- define "baton.clusterKeySecret" -}}
{{- default (printf "%s-cluster-key" (include "baton.fullname" .)) .Values.clusterKey.existingSecret -}}
{{- end -}}

{{- define "baton.clusterKeyItem" -}}
{{- if .Values.clusterKey.existingSecret -}}{{ .Values.clusterKey.secretKey }}{{- else -}}cluster.key{{- end -}}
{{- end -}}

{{/*
A generated secret value, kept across upgrades: the live Secret's, else a fresh random one.
(dict "root" $ "name" secretName "key" dataKey). `helm template` has no cluster to ask, so
every render there draws a new one.
*/}}
{{- define "baton.keptRandom" -}}
{{- $live := lookup "v1" "Secret" .root.Release.Namespace .name -}}
{{- if and $live $live.data (hasKey $live.data .key) -}}
{{- index $live.data .key | b64dec -}}
{{- else -}}
{{- randAlphaNum 64 -}}
{{- end -}}
{{- end -}}

{{- define "baton.apiKeySecret" -}}
{{- printf "%s-api-key" (include "baton.fullname" .) -}}
{{- end -}}

{{/* The generated client API key, computed once per render and shared by the Secret and the
config's sha256. */}}
{{- define "baton.generatedApiKey" -}}
{{- if not (hasKey .Values "_generatedApiKey") -}}
{{- $_ := set .Values "_generatedApiKey" (include "baton.keptRandom" (dict "root" . "name" (include "baton.apiKeySecret" .) "key" "api-key")) -}}
{{- end -}}
{{- index .Values "_generatedApiKey" -}}
{{- end -}}

{{/* Whether the chart makes the TLS Secrets: TLS on, and no role names its own. */}}
{{- define "baton.tlsGenerated" -}}
{{- if and .Values.tls.enabled (not .Values.tls.coordinator.secretName) (not .Values.tls.prefill.secretName) (not .Values.tls.decode.secretName) -}}true{{- end -}}
{{- end -}}

{{/* A role's TLS Secret: the one its values name, else the generated one. (dict "root" $ "role" role) */}}
{{- define "baton.tlsSecret" -}}
{{- default (printf "%s-%s-tls" (include "baton.fullname" .root) .role) (index .root.Values.tls .role).secretName -}}
{{- end -}}

{{/*
The generated TLS material, once per render: role -> {ca.crt, tls.crt, tls.key}. The live
Secrets' when all three exist (upgrades keep the CA every pod trusts), else a new CA (ten
years) and one certificate per role naming baton-<role>, what every client checks.
*/}}
{{- define "baton.generatedTls" -}}
{{- if not (hasKey .Values "_generatedTls") -}}
{{- $out := dict -}}
{{- range $role := list "coordinator" "prefill" "decode" -}}
{{- $live := lookup "v1" "Secret" $.Release.Namespace (include "baton.tlsSecret" (dict "root" $ "role" $role)) -}}
{{- if and $live $live.data (hasKey $live.data "tls.key") -}}
{{- $_ := set $out $role (dict "ca.crt" (index $live.data "ca.crt" | b64dec) "tls.crt" (index $live.data "tls.crt" | b64dec) "tls.key" (index $live.data "tls.key" | b64dec)) -}}
{{- end -}}
{{- end -}}
{{- if ne (len $out) 3 -}}
{{- $out = dict -}}
{{- $ca := genCA "baton CA" 3650 -}}
{{- range $role := list "coordinator" "prefill" "decode" -}}
{{- $name := printf "baton-%s" $role -}}
{{- $cert := genSignedCert $name nil (list $name) 3650 $ca -}}
{{- $_ := set $out $role (dict "ca.crt" $ca.Cert "tls.crt" $cert.Cert "tls.key" $cert.Key) -}}
{{- end -}}
{{- end -}}
{{- $_ := set .Values "_generatedTls" $out -}}
{{- end -}}
{{- toJson (index .Values "_generatedTls") -}}
{{- end -}}

{{- define "baton.generatedClusterKey" -}}
{{- if not (hasKey .Values "_generatedClusterKey") -}}
{{- $_ := set .Values "_generatedClusterKey" (include "baton.keptRandom" (dict "root" . "name" (include "baton.clusterKeySecret" .) "key" "cluster.key")) -}}
{{- end -}}
{{- index .Values "_generatedClusterKey" -}}
{{- end -}}

{{/* Cross-field rules the schema cannot say clearly; the schema refuses them first. */}}
{{- define "baton.checks" -}}
{{- if and .Values.cloud.enabled (gt (int .Values.coordinator.replicas) 1) (not .Values.tls.enabled) -}}
{{- fail "cloud.enabled with several coordinators needs tls.enabled: the coordinators replicate the budget ledger among themselves over mutual TLS" -}}
{{- end -}}
{{- $named := 0 -}}
{{- range $role := list "coordinator" "prefill" "decode" -}}
{{- if (index $.Values.tls $role).secretName -}}{{- $named = add1 $named -}}{{- end -}}
{{- end -}}
{{- if and .Values.tls.enabled (ne (int $named) 0) (ne (int $named) 3) -}}
{{- fail "tls: name every role's secretName (your Secrets, one CA) or none (the chart generates a CA and certificates)" -}}
{{- end -}}
{{- end -}}

{{/* TOML string or list of strings: JSON's literal is TOML's basic string. */}}
{{- define "baton.toml" -}}{{ toJson . }}{{- end -}}

{{/* A TOML float: %g, with ".0" where it would read as an integer. */}}
{{- define "baton.float" -}}
{{- $s := printf "%g" (float64 .) -}}
{{- if or (contains "." $s) (contains "e" $s) -}}{{ $s }}{{- else -}}{{ $s }}.0{{- end -}}
{{- end -}}

{{/* Pod-level settings every role shares: (dict "root" $ "role" name "r" roleValues). */}}
{{- define "baton.podCommon" -}}
{{- $root := .root -}}
serviceAccountName: {{ include "baton.serviceAccountName" $root }}
automountServiceAccountToken: false
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml $root.Values.podSecurityContext | nindent 2 }}
{{- with .r.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .r.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .r.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if .r.topologySpread.enabled }}
topologySpreadConstraints:
  - maxSkew: {{ int .r.topologySpread.maxSkew }}
    topologyKey: {{ .r.topologySpread.topologyKey }}
    whenUnsatisfiable: {{ .r.topologySpread.whenUnsatisfiable }}
    labelSelector:
      matchLabels:
        {{- include "baton.roleSelector" . | nindent 8 }}
    # Spread within one revision: a Deployment's pods carry pod-template-hash, a
    # StatefulSet's (the coordinators') controller-revision-hash.
    matchLabelKeys: [{{ if eq .role "coordinator" }}controller-revision-hash{{ else }}pod-template-hash{{ end }}]
{{- end }}
{{- end -}}

{{/* Pod metadata every role shares. */}}
{{- define "baton.podMetadata" -}}
{{- $root := .root -}}
labels:
  {{- include "baton.roleSelector" . | nindent 2 }}
  {{- with $root.Values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
annotations:
  checksum/config: {{ include (print $root.Template.BasePath "/configmap.yaml") $root | sha256sum }}
  {{- with $root.Values.podAnnotations }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end -}}

{{/* Volumes every role mounts. */}}
{{- define "baton.volumes" -}}
{{- $root := .root -}}
- name: config
  configMap:
    name: {{ include "baton.fullname" $root }}-config
- name: cluster-key
  secret:
    secretName: {{ include "baton.clusterKeySecret" $root }}
    defaultMode: 0440
    items:
      - key: {{ include "baton.clusterKeyItem" $root }}
        path: cluster.key
{{- if $root.Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ include "baton.tlsSecret" (dict "root" $root "role" .role) }}
    defaultMode: 0440
    items:
      - {key: ca.crt, path: ca.crt}
      - {key: tls.crt, path: tls.crt}
      - {key: tls.key, path: tls.key}
{{- end }}
{{- with $root.Values.model.volume }}
- name: model
  {{- toYaml . | nindent 2 }}
{{- end }}
- name: tmp
  emptyDir: {}
{{- end -}}

{{- define "baton.volumeMounts" -}}
{{- $root := .root -}}
- name: config
  mountPath: /etc/baton/config
  readOnly: true
- name: cluster-key
  mountPath: /etc/baton/cluster-key
  readOnly: true
{{- if $root.Values.tls.enabled }}
- name: tls
  mountPath: /etc/baton/tls
  readOnly: true
{{- end }}
{{- if $root.Values.model.volume }}
- name: model
  mountPath: {{ $root.Values.model.mountPath }}
  readOnly: true
{{- end }}
- name: tmp
  mountPath: /tmp
{{- end -}}
