{{/*
Names and labels. The kernel's configuration is built here as a dict and serialised with
toPrettyJson: no value is ever spliced into code or YAML as text.
*/}}

{{- define "sandbox-kernel.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "sandbox-kernel.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 48 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 48 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 48 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "sandbox-kernel.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object; "component" names the part ($ is the root context). */}}
{{- define "sandbox-kernel.labels" -}}
helm.sh/chart: {{ include "sandbox-kernel.chart" .root }}
{{ include "sandbox-kernel.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end -}}

{{- define "sandbox-kernel.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sandbox-kernel.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "sandbox-kernel.serviceAccountName" -}}
{{- default (include "sandbox-kernel.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "sandbox-kernel.configMapName" -}}
{{- printf "%s-config" (include "sandbox-kernel.fullname" .) -}}
{{- end -}}

{{/* "name:tag", or "name" alone when the tag is empty (name@sha256:...). */}}
{{- define "sandbox-kernel.image" -}}
{{- if .tag -}}{{ printf "%s:%s" .name .tag }}{{- else -}}{{ .name }}{{- end -}}
{{- end -}}

{{/*
The API resources each enforcer writes: [apiGroup, plural]. Mirrors ENFORCER_KINDS in
sandbox_kernel/backends/kubernetes/permissions.py (tests/helm checks that they agree).
*/}}
{{- define "sandbox-kernel.enforcerResources" -}}
{{- $kinds := dict
      "networkpolicy" (list (list "networking.k8s.io" "networkpolicies"))
      "gke-fqdn" (list (list "networking.k8s.io" "networkpolicies") (list "networking.gke.io" "fqdnnetworkpolicies"))
      "cilium" (list (list "cilium.io" "ciliumnetworkpolicies")) -}}
{{- $out := dict -}}
{{- range .Values.sandbox.enforcers -}}
{{- range (get $kinds .) -}}
{{- $group := index . 0 -}}
{{- $_ := set $out $group (append (get $out $group | default list) (index . 1) | uniq | sortAlpha) -}}
{{- end -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/*
The kernel's configuration, as traitlets reads a JSON config file:
{"SandboxKernel": {...}, "KubernetesBackend": {...}, "AdminPolicy": {...}}.
*/}}
{{- define "sandbox-kernel.kernelConfig" -}}
{{- $s := .Values.sandbox -}}
{{- $p := .Values.policy -}}
{{- $backend := dict
      "image" (include "sandbox-kernel.image" $s.image)
      "image_pull_policy" $s.image.pullPolicy
      "namespace_template" $s.namespaceTemplate
      "requests" $s.requests
      "limits" $s.limits
      "quota" $s.quota
      "node_selector" $s.nodeSelector
      "tolerations" $s.tolerations
      "enforcers" $s.enforcers
      "node_local_dns" (ternary "true" "false" $s.nodeLocalDNS)
      "gke_cloud_dns" (ternary "true" "false" $s.gkeCloudDNS)
      "start_timeout" $s.startTimeout
      "schedule_timeout" $s.scheduleTimeout
      "idle_timeout" $s.idleTimeout
      "orphan_timeout" $s.orphanTimeout
      "gc_on_start" $s.gcOnStart -}}
{{- if .Values.rbac.create -}}
{{- $_ := set $backend "namespace_role" (printf "%s-sandbox" (include "sandbox-kernel.fullname" .)) -}}
{{- $_ := set $backend "role_subject" (printf "ServiceAccount:%s:%s" .Release.Namespace (include "sandbox-kernel.kernelRoleSubject" .)) -}}
{{- end -}}
{{- if .Values.gvisor.enabled -}}
{{- $_ := set $backend "runtime_class" .Values.gvisor.runtimeClassName -}}
{{- end -}}
{{- $admin := dict
      "mode" $p.mode
      "entries" $p.entries
      "presets" $p.presets
      "locked" $p.locked
      "user_may_allow" $p.userMayAllow
      "max_entries" $p.maxEntries
      "always_blocked" $p.alwaysBlocked
      "cluster_ranges" $p.clusterRanges -}}
{{- dict "SandboxKernel" (dict "backend_name" "kubernetes") "KubernetesBackend" $backend "AdminPolicy" $admin | toPrettyJson -}}
{{- end -}}

{{/* Hub mode: the sandbox service's objects (Deployment, Service, PVC, ServiceAccount). */}}
{{- define "sandbox-kernel.hubName" -}}
{{- printf "%s-hub" (include "sandbox-kernel.fullname" .) -}}
{{- end -}}

{{/* The fixed prefix of user namespaces ("user-sandbox-" of "user-sandbox-{slug}"). */}}
{{- define "sandbox-kernel.namespacePrefix" -}}
{{- $parts := splitList "{slug}" .Values.sandbox.namespaceTemplate -}}
{{- first $parts -}}
{{- end -}}

{{/* The account the kernels' ClusterRole is bound to: the service's in hub mode, else the kernels'. */}}
{{- define "sandbox-kernel.kernelRoleSubject" -}}
{{- if .Values.hub.enabled -}}
{{- include "sandbox-kernel.hubName" . -}}
{{- else -}}
{{- include "sandbox-kernel.serviceAccountName" . -}}
{{- end -}}
{{- end -}}

{{/* Where the service keeps state.json and audit.jsonl (the PVC), and reads its configuration. */}}
{{- define "sandbox-kernel.hubStateDir" -}}/var/lib/sandbox-kernel-hub{{- end -}}
{{- define "sandbox-kernel.hubConfigDir" -}}/etc/sandbox-kernel{{- end -}}
