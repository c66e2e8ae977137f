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
{{- if and .Values.encryption.nodeToNode (ne .Values.encryption.type "wireguard") -}}
{{- fail (printf "encryption.nodeToNode=true needs encryption.type=wireguard, not %q: host traffic between nodes is encrypted by the same tunnels." .Values.encryption.type) -}}
{{- end -}}
{{- if and .Values.encryption.strictMode (ne .Values.encryption.type "wireguard") -}}
{{- fail (printf "encryption.strictMode=true needs encryption.type=wireguard, not %q: strict mode drops pod traffic between nodes that is not in a WireGuard tunnel." .Values.encryption.type) -}}
{{- end -}}
{{- if and .Values.k8sServicePort (not .Values.k8sServiceHost) -}}
{{- fail "k8sServicePort needs k8sServiceHost: the agent takes the API server's address and port together." -}}
{{- end -}}
{{- end -}}
