{{- define "pacer.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "pacer.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "pacer.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (printf "%s-operator" (include "pacer.fullname" .)) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "pacer.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* PACER_REDIS_URL from a Secret or a plain value. */}}
{{- define "pacer.redisEnv" -}}
- name: PACER_REDIS_URL
  {{- if .Values.redis.existingSecret.name }}
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret.name }}
      key: {{ .Values.redis.existingSecret.key }}
  {{- else }}
  value: {{ .Values.redis.url | quote }}
  {{- end }}
{{- end -}}

{{/* PACER_RECORDS_REDIS_URL from a Secret or a plain value; nothing when neither is set. */}}
{{- define "pacer.recordsRedisEnv" -}}
{{- with .Values.redis.records }}
{{- if .existingSecret.name }}
- name: PACER_RECORDS_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret.name }}
      key: {{ .existingSecret.key }}
{{- else if .url }}
- name: PACER_RECORDS_REDIS_URL
  value: {{ .url | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Namespaces whose Secrets the operator may get. */}}
{{- define "pacer.secretNamespaces" -}}
{{- if .Values.operator.secretNamespaces -}}
{{- toJson .Values.operator.secretNamespaces -}}
{{- else -}}
{{- toJson (list .Release.Namespace) -}}
{{- end -}}
{{- end -}}

{{/* maxReplicaCount: given, or what the pool's requests per minute can keep busy. */}}
{{- define "pacer.workerMaxReplicas" -}}
{{- $k := .Values.worker.keda -}}
{{- if gt (int $k.maxReplicaCount) 0 -}}
{{- $k.maxReplicaCount -}}
{{- else -}}
{{- $per := max 1 (int $k.requestsPerMinutePerReplica) -}}
{{- max 1 (div (add (int $k.poolRequestsPerMinute) (sub $per 1)) $per) -}}
{{- end -}}
{{- end -}}
