// Package manifest loads the Kubernetes objects that policy decisions depend
// on (Namespaces, Pods, Nodes, NetworkPolicies, MeshPolicies and
// ClusterMeshPolicies) from YAML and JSON manifest files, the way kubectl
// reads them: multi-document YAML, JSON streams, v1 List and typed *List
// kinds, directories walked recursively.
//
// Decoding is strict, as the API server's is with field validation on:
// unknown and duplicate fields are errors that name the file, the line, the
// object and the field. Loading never stops at the first problem; every
// problem found is in Set.Problems so that one run shows them all.
//
//	set, err := manifest.Load("deploy/policies/", "pods.yaml")
//	if err != nil { … }            // a path could not be read
//	for _, p := range set.Problems { fmt.Println(p) }
package manifest

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"

	yamlv3 "go.yaml.in/yaml/v3"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	strictjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"

	"github.com/veilmesh/veil/api/policy/v1alpha1"
)

// Kinds the loader keeps.
const (
	KindNamespace         = "Namespace"
	KindPod               = "Pod"
	KindNode              = "Node"
	KindNetworkPolicy     = "NetworkPolicy"
	KindMeshPolicy        = "MeshPolicy"
	KindClusterMeshPolicy = "ClusterMeshPolicy"
	// KindService is kept so that a trace can resolve a Service to the
	// pods it selects; policy never names Services.
	KindService = "Service"
)

// NamespaceNameLabel is the label the API server puts on every namespace;
// namespaceSelectors commonly match on it, so the loader sets it too.
const NamespaceNameLabel = "kubernetes.io/metadata.name"

const (
	groupNetworking = "networking.k8s.io"
	groupVeil       = "policy.veil.dev"
)

// Ref names an object: its kind, namespace (empty for cluster-scoped kinds)
// and name.
type Ref struct {
	Kind      string
	Namespace string
	Name      string
}

// String renders "Kind ns/name", or "Kind name" for cluster-scoped objects.
func (r Ref) String() string {
	if r.Kind == "" {
		r.Kind = "object"
	}
	if r.Name == "" {
		r.Name = "(unnamed)"
	}
	if r.Namespace == "" {
		return r.Kind + " " + r.Name
	}
	return r.Kind + " " + r.Namespace + "/" + r.Name
}

// Origin says where an object was read.
type Origin struct {
	File string
	// Document is the 1-based index of the YAML document or JSON value in
	// File.
	Document int
	// Line is the 1-based line where the object starts in File.
	Line int

	// itemPath is the object's path inside its document ("items[3]" for an
	// item of a List), so a field path can be found in the document.
	itemPath string
	doc      *document
}

// Set is the result of loading manifests.
type Set struct {
	Namespaces          []*corev1.Namespace
	Pods                []*corev1.Pod
	Nodes               []*corev1.Node
	NetworkPolicies     []*networkingv1.NetworkPolicy
	MeshPolicies        []*v1alpha1.MeshPolicy
	ClusterMeshPolicies []*v1alpha1.ClusterMeshPolicy
	Services            []*corev1.Service

	// Problems found while loading, in input order. Objects with errors are
	// still in the Set, so that validation can report more about them.
	Problems Problems

	origins map[Ref]*Origin
}

// Origin returns where the object named by ref was read. Implicit
// namespaces have no origin.
func (s *Set) Origin(ref Ref) (Origin, bool) {
	o, ok := s.origins[ref]
	if !ok {
		return Origin{}, false
	}
	return *o, true
}

// Problem builds a problem about the object named by ref, located at
// fieldPath (a field.Path string such as "spec.ingress[0].ports[1].port")
// when the field can be found in the source, else at the object.
func (s *Set) Problem(sev Severity, ref Ref, fieldPath, msg string) Problem {
	p := Problem{Severity: sev, Object: ref.String(), Field: fieldPath, Message: msg}
	if o, ok := s.origins[ref]; ok {
		p.File, p.Document, p.Line = o.File, o.Document, o.Line
		if l := o.doc.lineOf(joinPath(o.itemPath, fieldPath)); l > 0 {
			p.Line = l
		}
	}
	return p
}

// Loader reads manifests. The zero value is ready to use.
type Loader struct {
	// Stdin is read for the path "-". Nil means os.Stdin.
	Stdin io.Reader
}

// Load reads the manifests at paths with a zero Loader.
func Load(paths ...string) (*Set, error) {
	return Loader{}.Load(paths...)
}

// Load reads every path: a file (whatever its extension), "-" for standard
// input, or a directory, walked recursively for *.yaml, *.yml and *.json
// files in lexical order. The error is non-nil only when a path cannot be
// read or a directory holds no manifest; problems in the content are in
// Set.Problems.
func (l Loader) Load(paths ...string) (*Set, error) {
	if len(paths) == 0 {
		return nil, errors.New("load manifests: no file or directory given")
	}
	b := newBuilder()
	for _, p := range paths {
		if p == "-" {
			r := l.Stdin
			if r == nil {
				r = os.Stdin
			}
			data, err := io.ReadAll(r)
			if err != nil {
				return nil, fmt.Errorf("read manifests from standard input: %w", err)
			}
			b.addFile("<stdin>", data)
			continue
		}
		files, err := manifestFiles(p)
		if err != nil {
			return nil, err
		}
		for _, f := range files {
			data, err := os.ReadFile(f)
			if err != nil {
				return nil, fmt.Errorf("read manifest: %w", err)
			}
			b.addFile(f, data)
		}
	}
	return b.finish(), nil
}

// Parse loads manifests from memory, as if data had been read from a file
// called name.
func Parse(name string, data []byte) *Set {
	b := newBuilder()
	b.addFile(name, data)
	return b.finish()
}

func manifestFiles(path string) ([]string, error) {
	st, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("load manifests: %w", err)
	}
	if !st.IsDir() {
		return []string{path}, nil
	}
	var files []string
	err = filepath.WalkDir(path, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.Type().IsRegular() || d.Type()&fs.ModeSymlink != 0 {
			switch strings.ToLower(filepath.Ext(p)) {
			case ".yaml", ".yml", ".json":
				files = append(files, p)
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("walk manifest directory %s: %w", path, err)
	}
	if len(files) == 0 {
		return nil, fmt.Errorf("load manifests: no .yaml, .yml or .json file under %s", path)
	}
	return files, nil
}

type builder struct {
	set *Set
}

func newBuilder() *builder {
	return &builder{set: &Set{origins: map[Ref]*Origin{}}}
}

// document is one YAML document or JSON value of a file, kept so that a
// field path can be turned into a line when a problem is reported.
type document struct {
	file  string
	index int
	line  int // line of src's first byte in file
	src   []byte

	// tree is src parsed for locating fields, once it is needed.
	tree   *yamlv3.Node
	parsed bool
}

func (b *builder) problem(d *document, line int, ref Ref, fieldPath, msg string) {
	p := Problem{Severity: SeverityError, File: d.file, Document: d.index, Line: line, Field: fieldPath, Message: msg}
	if ref.Kind != "" || ref.Name != "" {
		p.Object = ref.String()
	}
	b.set.Problems = append(b.set.Problems, p)
}

func (b *builder) warn(o *Origin, ref Ref, fieldPath, msg string) {
	p := Problem{Severity: SeverityWarning, Object: ref.String(), Field: fieldPath, Message: msg}
	if o != nil {
		p.File, p.Document, p.Line = o.File, o.Document, o.Line
		if l := o.doc.lineOf(joinPath(o.itemPath, fieldPath)); l > 0 {
			p.Line = l
		}
	}
	b.set.Problems = append(b.set.Problems, p)
}

var utf8BOM = []byte{0xEF, 0xBB, 0xBF}

func (b *builder) addFile(name string, data []byte) {
	data = bytes.TrimPrefix(data, utf8BOM)
	trimmed := bytes.TrimLeft(data, " \t\r\n")
	if len(trimmed) > 0 && (trimmed[0] == '{' || trimmed[0] == '[') {
		b.addJSONStream(name, data)
		return
	}
	for i, d := range splitYAML(data) {
		d.file, d.index = name, i+1
		b.addYAMLDocument(d)
	}
}

// splitYAML cuts a multi-document YAML stream at "---" lines, as kubectl
// does, remembering where each document starts.
func splitYAML(data []byte) []*document {
	var docs []*document
	cur := &document{line: 1}
	start, lineNo := 0, 1
	for off := 0; off < len(data); {
		end := bytes.IndexByte(data[off:], '\n')
		next := len(data)
		if end >= 0 {
			next = off + end + 1
		}
		line := strings.TrimRight(string(data[off:next]), "\r\n")
		if rest, ok := strings.CutPrefix(line, "---"); ok {
			rest = strings.TrimSpace(rest)
			if rest == "" || strings.HasPrefix(rest, "#") {
				cur.src = data[start:off]
				docs = append(docs, cur)
				cur = &document{line: lineNo + 1}
				start = next
			}
		}
		off = next
		lineNo++
	}
	cur.src = data[start:]
	return append(docs, cur)
}

// yamlLine finds "line N" in a YAML parser message, relative to a document.
var yamlLine = regexp.MustCompile(`line (\d+)`)

func (b *builder) addYAMLDocument(d *document) {
	js, err := yaml.YAMLToJSONStrict(d.src)
	if err != nil {
		line := d.line
		msg := yamlLine.ReplaceAllStringFunc(err.Error(), func(m string) string {
			n, convErr := strconv.Atoi(strings.TrimPrefix(m, "line "))
			if convErr != nil {
				return m
			}
			if line == d.line {
				line = d.line + n - 1
			}
			return fmt.Sprintf("line %d", d.line+n-1)
		})
		b.problem(d, line, Ref{}, "", "invalid YAML: "+strings.TrimPrefix(msg, "error converting YAML to JSON: "))
		return
	}
	js = bytes.TrimSpace(js)
	if len(js) == 0 || string(js) == "null" {
		return
	}
	b.addDocument(d, js)
}

func (b *builder) addJSONStream(name string, data []byte) {
	dec := json.NewDecoder(bytes.NewReader(data))
	for i := 1; ; i++ {
		start := int(dec.InputOffset())
		var raw json.RawMessage
		err := dec.Decode(&raw)
		if errors.Is(err, io.EOF) {
			return
		}
		// Skip the whitespace between values so the line is the value's.
		for start < len(data) && strings.IndexByte(" \t\r\n", data[start]) >= 0 {
			start++
		}
		d := &document{file: name, index: i, line: 1 + bytes.Count(data[:start], []byte("\n"))}
		if err != nil {
			line := d.line
			var se *json.SyntaxError
			if errors.As(err, &se) && int(se.Offset) <= len(data) {
				line = 1 + bytes.Count(data[:se.Offset], []byte("\n"))
			}
			b.problem(d, line, Ref{}, "", "invalid JSON: "+err.Error())
			return
		}
		d.src = raw
		b.addDocument(d, raw)
	}
}

// addDocument takes one top-level value of a file.
func (b *builder) addDocument(d *document, js []byte) {
	if js[0] != '{' {
		b.problem(d, d.line, Ref{}, "", "a manifest document must be an object with apiVersion and kind")
		return
	}
	b.addObject(&Origin{File: d.file, Document: d.index, Line: d.line, doc: d}, js, "", "")
}

// header is the part of an object that says what it is. Fields are decoded
// one by one so that a badly typed field still leaves the others usable for
// naming the object in problems.
type header struct {
	APIVersion, Kind, Name, Namespace string
	Items                             []json.RawMessage
	HasItems                          bool
}

func readHeader(js []byte) header {
	var top map[string]json.RawMessage
	_ = json.Unmarshal(js, &top)
	var h header
	_ = json.Unmarshal(top["apiVersion"], &h.APIVersion)
	_ = json.Unmarshal(top["kind"], &h.Kind)
	var meta map[string]json.RawMessage
	_ = json.Unmarshal(top["metadata"], &meta)
	_ = json.Unmarshal(meta["name"], &h.Name)
	_ = json.Unmarshal(meta["namespace"], &h.Namespace)
	if items, ok := top["items"]; ok {
		h.HasItems = true
		_ = json.Unmarshal(items, &h.Items)
	}
	return h
}

func splitAPIVersion(apiVersion string) (group, version string) {
	if g, v, ok := strings.Cut(apiVersion, "/"); ok {
		return g, v
	}
	return "", apiVersion
}

// kindInfo describes a kind the loader keeps.
type kindInfo struct {
	group, version string
	namespaced     bool
}

var kinds = map[string]kindInfo{
	KindNamespace:         {"", "v1", false},
	KindPod:               {"", "v1", true},
	KindNode:              {"", "v1", false},
	KindNetworkPolicy:     {groupNetworking, "v1", true},
	KindMeshPolicy:        {groupVeil, "v1alpha1", true},
	KindClusterMeshPolicy: {groupVeil, "v1alpha1", false},
	KindService:           {"", "v1", true},
}

// addObject takes one object: a top-level document (itemPath "") or an item
// of a List. defKind and defAPIVersion fill in what typed lists leave out of
// their items.
func (b *builder) addObject(o *Origin, js []byte, defKind, defAPIVersion string) {
	h := readHeader(js)
	if h.Kind == "" {
		h.Kind = defKind
	}
	if h.APIVersion == "" {
		h.APIVersion = defAPIVersion
	}
	ref := Ref{Kind: h.Kind, Namespace: h.Namespace, Name: h.Name}
	line := o.doc.lineOf(o.itemPath)
	if line == 0 {
		line = o.Line
	}
	o.Line = line
	switch {
	case h.Kind == "":
		b.problem(o.doc, o.Line, ref, joinPath(o.itemPath, "kind"), "required field is missing")
		return
	case h.APIVersion == "":
		b.problem(o.doc, o.Line, ref, joinPath(o.itemPath, "apiVersion"), "required field is missing")
		return
	case h.HasItems && (h.Kind == "List" || strings.HasSuffix(h.Kind, "List")):
		b.addList(o, js, h)
		return
	}
	info, known := kinds[h.Kind]
	group, version := splitAPIVersion(h.APIVersion)
	if !known {
		b.warn(o, ref, "", fmt.Sprintf("kind %s (%s) has no bearing on policy; ignored", h.Kind, h.APIVersion))
		return
	}
	if group != info.group || version != info.version {
		want := info.version
		if info.group != "" {
			want = info.group + "/" + info.version
		}
		b.warn(o, ref, "apiVersion", fmt.Sprintf("%s %s is not supported (want %s); ignored", h.Kind, h.APIVersion, want))
		return
	}
	if info.namespaced && ref.Namespace == "" {
		ref.Namespace = metav1.NamespaceDefault
	}
	if !info.namespaced {
		if ref.Namespace != "" {
			b.warn(o, Ref{Kind: ref.Kind, Name: ref.Name}, "metadata.namespace", fmt.Sprintf("%s is cluster-scoped; namespace %q ignored", h.Kind, ref.Namespace))
		}
		ref.Namespace = ""
	}

	var meta *metav1.ObjectMeta
	switch h.Kind {
	case KindNamespace:
		obj := &corev1.Namespace{}
		b.decode(o, ref, js, obj)
		meta = &obj.ObjectMeta
		b.set.Namespaces = append(b.set.Namespaces, obj)
	case KindPod:
		obj := &corev1.Pod{}
		b.decode(o, ref, js, obj)
		meta = &obj.ObjectMeta
		b.set.Pods = append(b.set.Pods, obj)
	case KindNode:
		obj := &corev1.Node{}
		b.decode(o, ref, js, obj)
		meta = &obj.ObjectMeta
		b.set.Nodes = append(b.set.Nodes, obj)
	case KindNetworkPolicy:
		obj := &networkingv1.NetworkPolicy{}
		b.decode(o, ref, js, obj)
		meta = &obj.ObjectMeta
		b.set.NetworkPolicies = append(b.set.NetworkPolicies, obj)
	case KindMeshPolicy:
		obj := &v1alpha1.MeshPolicy{}
		b.decode(o, ref, js, obj)
		b.requireFields(o, ref, js, "spec", "podSelector")
		meta = &obj.ObjectMeta
		b.set.MeshPolicies = append(b.set.MeshPolicies, obj)
	case KindClusterMeshPolicy:
		obj := &v1alpha1.ClusterMeshPolicy{}
		b.decode(o, ref, js, obj)
		b.requireFields(o, ref, js, "spec", "podSelector")
		meta = &obj.ObjectMeta
		b.set.ClusterMeshPolicies = append(b.set.ClusterMeshPolicies, obj)
	case KindService:
		obj := &corev1.Service{}
		b.decode(o, ref, js, obj)
		meta = &obj.ObjectMeta
		b.set.Services = append(b.set.Services, obj)
	}
	// The decoded object must agree with the ref problems are filed under,
	// whatever the type errors left in it.
	meta.Name, meta.Namespace = ref.Name, ref.Namespace
	// A missing name is for validation to report; unnamed objects are not
	// duplicates of each other.
	if prev, dup := b.set.origins[ref]; dup && ref.Name != "" {
		b.problem(o.doc, o.Line, ref, "", fmt.Sprintf("defined twice; first at %s:%d", prev.File, prev.Line))
		return
	}
	b.set.origins[ref] = o
}

// addList takes a v1 List (items carry their own kind) or a typed list such
// as PodList (items may leave kind and apiVersion out).
func (b *builder) addList(o *Origin, js []byte, h header) {
	ref := Ref{Kind: h.Kind, Name: h.Name}
	var list struct {
		metav1.TypeMeta `json:",inline"`
		metav1.ListMeta `json:"metadata"`
		Items           []json.RawMessage `json:"items"`
	}
	b.decode(o, ref, js, &list)
	defKind, defAPIVersion := "", ""
	if h.Kind != "List" {
		defKind, defAPIVersion = strings.TrimSuffix(h.Kind, "List"), h.APIVersion
		if _, known := kinds[defKind]; !known {
			b.warn(o, ref, "", fmt.Sprintf("kind %s (%s) has no bearing on policy; ignored", h.Kind, h.APIVersion))
			return
		}
	}
	for i, item := range h.Items {
		item = bytes.TrimSpace(item)
		itemPath := joinPath(o.itemPath, fmt.Sprintf("items[%d]", i))
		if len(item) == 0 || item[0] != '{' {
			b.problem(o.doc, o.Line, ref, itemPath, "a list item must be an object")
			continue
		}
		itemOrigin := &Origin{File: o.File, Document: o.Document, Line: o.Line, itemPath: itemPath, doc: o.doc}
		b.addObject(itemOrigin, item, defKind, defAPIVersion)
	}
}

// decode strictly decodes js into obj, filing every unknown or duplicate
// field and every type error as a problem of the object.
func (b *builder) decode(o *Origin, ref Ref, js []byte, obj any) {
	strictErrs, err := strictjson.UnmarshalStrict(js, obj)
	for _, se := range strictErrs {
		msg, fieldPath := se.Error(), ""
		var fe interface{ FieldPath() string }
		if errors.As(se, &fe) {
			fieldPath = fe.FieldPath()
			msg, _, _ = strings.Cut(msg, " \"")
		}
		b.fieldProblem(o, ref, fieldPath, msg)
	}
	if err != nil {
		msg, fieldPath := strings.TrimPrefix(err.Error(), "json: "), ""
		if got, want, path, ok := typeErrorParts(err); ok {
			fieldPath = withoutInlineStructs(path)
			if _, followed := o.doc.locate(joinPath(o.itemPath, fieldPath)); o.itemPath == "" {
				fieldPath = followed
			} else if rest, ok := strings.CutPrefix(followed, o.itemPath); ok {
				fieldPath = strings.TrimPrefix(rest, ".")
			}
			msg = fmt.Sprintf("must be of type %s, not %s", want, got)
			if got == "bool" && want == "string" {
				msg += " (quote the value: YAML reads y, n, yes, no, on, off, true and false as booleans)"
			}
		}
		b.fieldProblem(o, ref, fieldPath, msg)
	}
}

// typeErrorParts reads an encoding/json UnmarshalTypeError: the JSON type
// found, the type wanted in a manifest author's words, and the field path.
// sigs.k8s.io/json returns its own copy of that type from an internal
// package, so errors.As cannot name it; its exported fields are read
// instead.
func typeErrorParts(err error) (got, want, path string, ok bool) {
	v := reflect.ValueOf(err)
	if v.Kind() == reflect.Pointer {
		v = v.Elem()
	}
	if v.Kind() != reflect.Struct || v.Type().Name() != "UnmarshalTypeError" {
		return "", "", "", false
	}
	value, field, typ := v.FieldByName("Value"), v.FieldByName("Field"), v.FieldByName("Type")
	if value.Kind() != reflect.String || field.Kind() != reflect.String || !typ.IsValid() {
		return "", "", "", false
	}
	t, isType := typ.Interface().(reflect.Type)
	if !isType || t == nil {
		return "", "", "", false
	}
	return value.String(), jsonTypeName(t), field.String(), true
}

// jsonTypeName names the JSON type that decodes into t.
func jsonTypeName(t reflect.Type) string {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	switch t.Kind() {
	case reflect.String:
		return "string"
	case reflect.Bool:
		return "boolean"
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return "integer"
	case reflect.Float32, reflect.Float64:
		return "number"
	case reflect.Slice, reflect.Array:
		return "list"
	}
	return "object"
}

// withoutInlineStructs drops the Go names of embedded structs that
// encoding/json puts in field paths ("spec.PolicyRules.ingress").
func withoutInlineStructs(path string) string {
	parts := strings.Split(path, ".")
	kept := parts[:0]
	for _, p := range parts {
		if p != "" && (p[0] < 'A' || p[0] > 'Z') {
			kept = append(kept, p)
		}
	}
	return strings.Join(kept, ".")
}

func (b *builder) fieldProblem(o *Origin, ref Ref, fieldPath, msg string) {
	full := joinPath(o.itemPath, fieldPath)
	line := o.doc.lineOf(full)
	if line == 0 {
		line = o.Line
	}
	b.problem(o.doc, line, ref, fieldPath, msg)
}

// requireFields reports the fields that the CRD schema requires but that Go
// decoding cannot tell from empty: obj.spec and obj.spec.<field>.
func (b *builder) requireFields(o *Origin, ref Ref, js []byte, spec string, fields ...string) {
	var top map[string]json.RawMessage
	if json.Unmarshal(js, &top) != nil {
		return
	}
	raw, ok := top[spec]
	if !ok {
		b.fieldProblem(o, ref, spec, "required field is missing")
		return
	}
	var sp map[string]json.RawMessage
	if json.Unmarshal(raw, &sp) != nil {
		return
	}
	for _, f := range fields {
		if _, ok := sp[f]; !ok {
			b.fieldProblem(o, ref, spec+"."+f, "required field is missing")
		}
	}
}

// finish applies what the API server would have done to the objects as a
// whole: the namespace name label, and namespaces that objects refer to but
// the files do not define.
func (b *builder) finish() *Set {
	s := b.set
	known := map[string]bool{}
	for _, ns := range s.Namespaces {
		if ns.Labels == nil {
			ns.Labels = map[string]string{}
		}
		ns.Labels[NamespaceNameLabel] = ns.Name
		known[ns.Name] = true
	}
	implicit := func(kind, ns, name string) {
		if known[ns] {
			return
		}
		known[ns] = true
		ref := Ref{Kind: kind, Namespace: ns, Name: name}
		b.warn(s.origins[ref], ref, "metadata.namespace", fmt.Sprintf("namespace %q is not defined in the input; assuming it exists with no labels but %s", ns, NamespaceNameLabel))
		s.Namespaces = append(s.Namespaces, &corev1.Namespace{
			TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: KindNamespace},
			ObjectMeta: metav1.ObjectMeta{Name: ns, Labels: map[string]string{NamespaceNameLabel: ns}},
		})
	}
	for _, p := range s.Pods {
		implicit(KindPod, p.Namespace, p.Name)
	}
	for _, p := range s.NetworkPolicies {
		implicit(KindNetworkPolicy, p.Namespace, p.Name)
	}
	for _, p := range s.MeshPolicies {
		implicit(KindMeshPolicy, p.Namespace, p.Name)
	}
	b.checkPodIPs()
	return s
}

// checkPodIPs flags pod IPs that cannot be parsed or that two pods claim:
// policy decisions map IPs to pods, so either makes a verdict ambiguous.
func (b *builder) checkPodIPs() {
	s := b.set
	owner := map[netip.Addr]*corev1.Pod{}
	for _, p := range s.Pods {
		ref := Ref{Kind: KindPod, Namespace: p.Namespace, Name: p.Name}
		o := s.origins[ref]
		ips := []string{}
		if p.Status.PodIP != "" {
			ips = append(ips, p.Status.PodIP)
		}
		for _, pip := range p.Status.PodIPs {
			if !slices.Contains(ips, pip.IP) {
				ips = append(ips, pip.IP)
			}
		}
		for _, ip := range ips {
			addr, err := netip.ParseAddr(ip)
			if err != nil {
				if o != nil {
					b.set.Problems = append(b.set.Problems, s.Problem(SeverityError, ref, "status.podIP", fmt.Sprintf("%q is not an IP address", ip)))
				}
				continue
			}
			if p.Spec.HostNetwork {
				continue
			}
			if prev, dup := owner[addr]; dup {
				b.warn(o, ref, "status.podIP", fmt.Sprintf("IP %s is also the IP of Pod %s/%s", addr, prev.Namespace, prev.Name))
				continue
			}
			owner[addr] = p
		}
	}
}

func joinPath(prefix, path string) string {
	switch {
	case prefix == "":
		return path
	case path == "":
		return prefix
	case path[0] == '[':
		return prefix + path
	}
	return prefix + "." + path
}
