{{/* Names and labels. Full name: the release name, or RELEASE-nanoserve when it doesn't say nanoserve. */}}
{{- define "nanoserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "nanoserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "nanoserve.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "nanoserve.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "nanoserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "nanoserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "nanoserve.labels" -}}
{{ include "nanoserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "nanoserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "nanoserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
What the operator does in each namespace it serves (tests/helm/test_rbac.py checks these against the
API calls a real `kopf run` makes, and against what the Roles it creates for gateways grant).
Children are written by server-side apply: `create` as well as `patch` for the first apply.
*/}}
{{- define "nanoserve.namespacedRules" -}}
- apiGroups: [serving.nanoserve.io]
  resources: [inferenceservices]
  verbs: [get, list, watch, patch]
- apiGroups: [serving.nanoserve.io]
  resources: [inferenceservices/status]
  verbs: [patch]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, create, patch, delete]
- apiGroups: [""]
  resources: [services, serviceaccounts]
  verbs: [create, patch, delete]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [create, patch, delete]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [create, patch, delete]
- apiGroups: [autoscaling]
  resources: [horizontalpodautoscalers]
  verbs: [create, patch, delete]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [create, patch, delete]
# spec.router inferencePool: Gateway API Inference Extension's InferencePool (its CRD installed with the Gateway).
- apiGroups: [inference.networking.k8s.io]
  resources: [inferencepools]
  verbs: [create, patch, delete]
# spec.autoscaling where KEDA is installed: its ScaledObject instead of the HPA (whether KEDA is there is
# API discovery, which every authenticated user may read).
- apiGroups: [keda.sh]
  resources: [scaledobjects]
  verbs: [create, patch, delete]
# Model volumes the user names are looked up; a model cache the spec asks for is created (never deleted:
# it goes with its InferenceService, by owner reference). No delete, no pod writes.
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [get, create, patch]
# The engine pods' status: the model download's report (its termination message) and their start to Ready.
- apiGroups: [""]
  resources: [pods]
  verbs: [list]
# Granted to each gateway's Role: Kubernetes lets the operator grant only what it holds itself.
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [get, list, watch]
# (spec.scaleToZero: the gateway reads and sets its InferenceService's scale.)
- apiGroups: [serving.nanoserve.io]
  resources: [inferenceservices/scale]
  verbs: [get, patch]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end }}

{{/*
kopf's peering (peering.yaml): it lists and watches the peering objects of its scope, and writes its keep-alive
into the status of its own one by merge patch; the resync loop reads that one (operator/peering.py).
The argument: the resource, clusterkopfpeerings (cluster-wide) or kopfpeerings (in each watched namespace).
*/}}
{{- define "nanoserve.peeringRules" -}}
- apiGroups: [kopf.dev]
  resources: [{{ .resource }}]
  verbs: [list, watch]
- apiGroups: [kopf.dev]
  resources: [{{ .resource }}]
  resourceNames: [{{ include "nanoserve.fullname" .root }}]
  verbs: [get, patch]
{{- end }}
