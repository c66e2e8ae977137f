{{/* The agent image reference. */}}
{{- define "veil.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* Labels every object carries. */}}
{{- define "veil.labels" -}}
app.kubernetes.io/part-of: veil
{{- end -}}

{{/*
Settings the chart refuses, so that an install never silently does less
than its values say.
*/}}
{{- define "veil.validate" -}}
{{- if .Values.encryption.nodeToNode -}}
{{- fail "encryption.nodeToNode=true: node-to-node (host-network) encryption is not yet supported by Veil. Pod-to-pod traffic between nodes is encrypted with encryption.type=wireguard; set encryption.nodeToNode=false." -}}
{{- end -}}
{{- if and .Values.encryption.strictMode (ne .Values.encryption.type "wireguard") -}}
{{- fail (printf "encryption.strictMode=true needs encryption.type=wireguard, not %q: strict mode drops pod traffic between nodes that is not in a WireGuard tunnel." .Values.encryption.type) -}}
{{- end -}}
{{- end -}}
