{{/* The name of every object the release owns (the controller, its ServiceAccount, ...). */}}
{{- define "imagestream.fullname" -}}
{{- if contains "imagestream-operator" .Release.Name -}}
{{- .Release.Name | trunc 53 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-imagestream-operator" .Release.Name | trunc 53 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "imagestream.labels" -}}
app.kubernetes.io/name: imagestream-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of the controller Pod. */}}
{{- define "imagestream.selectorLabels" -}}
app.kubernetes.io/name: imagestream-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end -}}

{{/* Whether every namespace is watched (`watchNamespaces: []`). */}}
{{- define "imagestream.allNamespaces" -}}
{{- if and (kindIs "slice" .Values.watchNamespaces) (eq (len .Values.watchNamespaces) 0) -}}true{{- end -}}
{{- end -}}

{{/* The watched namespaces as a JSON list (empty when all are watched). */}}
{{- define "imagestream.namespaces" -}}
{{- if include "imagestream.allNamespaces" . -}}
[]
{{- else if .Values.watchNamespaces -}}
{{- .Values.watchNamespaces | uniq | toJson -}}
{{- else -}}
{{- list .Release.Namespace | toJson -}}
{{- end -}}
{{- end -}}

{{/* An image reference: repository, then @digest if given, else :tag. */}}
{{- define "imagestream.image" -}}
{{- if .digest -}}
{{- printf "%s@%s" .repository .digest -}}
{{- else -}}
{{- printf "%s:%s" .repository .tag -}}
{{- end -}}
{{- end -}}

{{- define "imagestream.controllerImage" -}}
{{- $image := .Values.images.controller -}}
{{- include "imagestream.image" (dict "repository" $image.repository "tag" ($image.tag | default .Chart.AppVersion) "digest" $image.digest) -}}
{{- end -}}

{{/* The agent's image: the controller's unless a repository, tag or digest is given. */}}
{{- define "imagestream.agentImage" -}}
{{- $controller := .Values.images.controller -}}
{{- $agent := .Values.images.agent -}}
{{- $repository := $agent.repository | default $controller.repository -}}
{{- $tag := $agent.tag | default $controller.tag | default .Chart.AppVersion -}}
{{- $digest := $agent.digest -}}
{{- if and (not $digest) (eq $repository $controller.repository) (not $agent.tag) -}}
{{- $digest = $controller.digest -}}
{{- end -}}
{{- include "imagestream.image" (dict "repository" $repository "tag" $tag "digest" $digest) -}}
{{- end -}}

{{/* imagePullSecrets of both ServiceAccounts. */}}
{{- define "imagestream.pullSecrets" -}}
{{- with .Values.images.pullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The CRD from crds/ (the chart's files/ holds a link to it), parsed. */}}
{{- define "imagestream.crd" -}}
{{- .Files.Get "files/imagestream.dev_imagestreams.yaml" -}}
{{- end -}}
