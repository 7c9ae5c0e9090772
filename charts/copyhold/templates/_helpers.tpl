{{/* Name of the chart, at most 63 characters. */}}
{{- define "copyhold.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Fully qualified name: release-chart, at most 63 characters. */}}
{{- define "copyhold.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Standard labels. */}}
{{- define "copyhold.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "copyhold.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: copyhold
{{- end -}}

{{/* Standard labels of one component: call with (dict "root" . "component" "gateway"). */}}
{{- define "copyhold.componentLabels" -}}
{{ include "copyhold.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Selector labels of one component. */}}
{{- define "copyhold.selectorLabels" -}}
app.kubernetes.io/name: {{ include "copyhold.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The copyhold image: by digest when one is given. */}}
{{- define "copyhold.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}{{ with .Values.image.tag }}:{{ . }}{{ end }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end -}}

{{/* Restricted pod security: non-root, no privilege escalation, seccomp. */}}
{{- define "copyhold.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Restricted container security: read-only root, no capabilities. */}}
{{- define "copyhold.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The gateway's rules on namespaced objects. */}}
{{- define "copyhold.gatewayNamespacedRules" -}}
- apiGroups: ["copyhold.dev"]
  resources: ["stintquotas", "modeldeployments"]
  verbs: ["get", "list", "watch"]
# The register: leased slices are written to the StintQuota's status.
- apiGroups: ["copyhold.dev"]
  resources: ["stintquotas/status"]
  verbs: ["get", "update"]
# The serving Pods (members' key Secrets are read only through the
# `-gateway-keys` Roles, in gateway.keyNamespaces).
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
# Owners of the serving Pods (metadata only): a Pod is an upstream only if
# its ReplicaSet's Deployment is the ModelDeployment's.
- apiGroups: ["apps"]
  resources: ["replicasets", "deployments"]
  verbs: ["get", "list", "watch"]
# A quota's Valid condition (inconsistent sanctions, a key under two
# members) is written with the register, and announced as an Event.
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
# The autoscaler's input: one Lease per replica and namespace carrying the
# requests in flight and held per model. And the register's slices: one
# Lease per replica and StintQuota (its own written with update; those of
# replicas found dead listed, charged and deleted).
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["get", "list", "create", "update", "patch", "delete"]
{{- end -}}


{{/*
Namespaces whose key Secrets the gateway reads: gateway.keyNamespaces, else
gateway.watchNamespace, else the release namespace.
*/}}
{{- define "copyhold.gatewayKeyNamespaces" -}}
{{- if .Values.gateway.keyNamespaces -}}
{{- join "," .Values.gateway.keyNamespaces -}}
{{- else if .Values.gateway.watchNamespace -}}
{{- .Values.gateway.watchNamespace -}}
{{- else -}}
{{- .Release.Namespace -}}
{{- end -}}
{{- end -}}
