{{/* Names, labels and the pieces every celeriac pod shares. */}}

{{- define "celeriac.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "celeriac.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: celeriac
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "email"). */}}
{{- define "celeriac.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "celeriac.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "celeriac.secretName" -}}
{{- .Values.existingSecret | default (printf "%s-env" (include "celeriac.fullname" .)) -}}
{{- end -}}

{{- define "celeriac.configName" -}}
{{- printf "%s-config" (include "celeriac.fullname" .) -}}
{{- end -}}

{{/* Pod-level settings shared by every celeriac pod. */}}
{{- define "celeriac.podSpec" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Container settings shared by every celeriac container: image, environment, config mount. */}}
{{- define "celeriac.container" -}}
image: {{ include "celeriac.image" . | quote }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
securityContext:
  {{- toYaml .Values.securityContext | nindent 2 }}
env:
  - name: CELERIAC_CONFIG
    value: /etc/celeriac/celeriac.toml
envFrom:
  - secretRef:
      name: {{ include "celeriac.secretName" . }}
{{- end -}}

{{/* The config files, and a writable /tmp under a read-only root filesystem. */}}
{{- define "celeriac.configVolume" -}}
- name: config
  configMap:
    name: {{ include "celeriac.configName" . }}
- name: tmp
  emptyDir: {}
{{- end -}}

{{- define "celeriac.configMount" -}}
- name: config
  mountPath: /etc/celeriac
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- end -}}
