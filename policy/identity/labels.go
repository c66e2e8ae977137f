package identity

import (
	"slices"
	"sort"
	"strconv"
	"strings"
)

// Label sources. Each label of a canonical set is "source:key=value"; the
// source keeps pod labels, namespace labels and metadata apart even when
// their keys are equal, and cannot clash with a Kubernetes label key, which
// never contains ':'.
const (
	SourcePod       = "pod"  // the pod's own labels
	SourceNamespace = "ns"   // the labels of the pod's namespace
	SourceMeta      = "meta" // namespace name and service account
	SourceReserved  = "reserved"

	MetaNamespace      = "namespace"
	MetaServiceAccount = "serviceaccount"
)

// Label is one element of a canonical label set.
type Label struct {
	Source string `json:"source"`
	Key    string `json:"key"`
	Value  string `json:"value"`
}

func (l Label) String() string {
	// A reserved identity is a name, not a key with a value.
	if l.Source == SourceReserved && l.Value == "" {
		return l.Source + ":" + l.Key
	}
	return l.Source + ":" + l.Key + "=" + l.Value
}

// Labels is a canonical label set, sorted by source, key.
type Labels []Label

// PodLabels builds the canonical label set of a pod. An empty service
// account is the namespace's "default", as the API server would set it.
func PodLabels(namespace string, podLabels, namespaceLabels map[string]string, serviceAccount string) Labels {
	if serviceAccount == "" {
		serviceAccount = "default"
	}
	ls := make(Labels, 0, len(podLabels)+len(namespaceLabels)+2)
	for k, v := range podLabels {
		ls = append(ls, Label{SourcePod, k, v})
	}
	for k, v := range namespaceLabels {
		ls = append(ls, Label{SourceNamespace, k, v})
	}
	ls = append(ls, Label{SourceMeta, MetaNamespace, namespace}, Label{SourceMeta, MetaServiceAccount, serviceAccount})
	sort.Slice(ls, func(i, j int) bool {
		if ls[i].Source != ls[j].Source {
			return ls[i].Source < ls[j].Source
		}
		return ls[i].Key < ls[j].Key
	})
	return ls
}

// Key is the canonical string of the set, used as the allocator key. Valid
// label keys and values contain none of the separators; anything that does
// (an object the API server would have rejected) is quoted so that two
// different sets never share a key.
func (ls Labels) Key() string {
	var b strings.Builder
	for i, l := range ls {
		if i > 0 {
			b.WriteByte(';')
		}
		b.WriteString(l.Source)
		b.WriteByte(':')
		b.WriteString(quoteIfNeeded(l.Key))
		b.WriteByte('=')
		b.WriteString(quoteIfNeeded(l.Value))
	}
	return b.String()
}

// AppendPodKey appends PodLabels(namespace, podLabels, namespaceLabels,
// serviceAccount).Key() to dst, building the set in scratch: a compiler
// that looks an identity up for every pod of the cluster allocates nothing
// for the pods whose identity exists. It returns both buffers for reuse.
func AppendPodKey(dst []byte, scratch Labels, namespace string, podLabels, namespaceLabels map[string]string, serviceAccount string) ([]byte, Labels) {
	if serviceAccount == "" {
		serviceAccount = "default"
	}
	ls := scratch[:0]
	for k, v := range podLabels {
		ls = append(ls, Label{SourcePod, k, v})
	}
	for k, v := range namespaceLabels {
		ls = append(ls, Label{SourceNamespace, k, v})
	}
	ls = append(ls, Label{SourceMeta, MetaNamespace, namespace}, Label{SourceMeta, MetaServiceAccount, serviceAccount})
	slices.SortFunc(ls, func(a, b Label) int {
		if c := strings.Compare(a.Source, b.Source); c != 0 {
			return c
		}
		return strings.Compare(a.Key, b.Key)
	})
	for i, l := range ls {
		if i > 0 {
			dst = append(dst, ';')
		}
		dst = append(dst, l.Source...)
		dst = append(dst, ':')
		dst = appendQuotedIfNeeded(dst, l.Key)
		dst = append(dst, '=')
		dst = appendQuotedIfNeeded(dst, l.Value)
	}
	clear(ls) // no references to the caller's strings kept
	return dst, ls[:0]
}

func appendQuotedIfNeeded(dst []byte, s string) []byte {
	if strings.ContainsAny(s, ";=:\"\\") {
		return strconv.AppendQuote(dst, s)
	}
	return append(dst, s...)
}

func quoteIfNeeded(s string) string {
	if strings.ContainsAny(s, ";=:\"\\") {
		return strconv.Quote(s)
	}
	return s
}

func (ls Labels) String() string { return ls.Key() }

// ReservedLabels returns the label set shown for a reserved identity, e.g.
// "reserved:world=", or nil when id is not reserved.
func ReservedLabels(id ID) Labels {
	if n := id.ReservedName(); n != "" {
		return Labels{{Source: SourceReserved, Key: n}}
	}
	return nil
}
