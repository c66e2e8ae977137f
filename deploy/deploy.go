// Package deploy holds Veil's installation manifests and reads them, so
// that what users install is what the tests and the local lab run.
//
// The manifests in manifests/ are generated from the Helm chart in
// helm/veil (`make manifests`) and embedded here. The local lab starts each
// agent with the command, args and environment of the DaemonSet:
//
//	argv, env, err := deploy.AgentInvocation("node-1", map[string]string{
//		"VEIL_SOCKET": "/run/veil-lab/node-1/agent.sock",
//	})
//	cmd := exec.Command(agentBinary, argv[1:]...)
//	cmd.Env = env
//
// Everything here is read-only and safe for concurrent use.
package deploy

import (
	"bytes"
	"embed"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"path"
	"slices"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
)

// Names of the objects in the manifests.
const (
	Namespace          = "veil-system"
	ServiceAccountName = "veil-agent"
	DaemonSetName      = "veil-agent"
	ConfigMapName      = "veil-config"
	// AgentContainer is the DaemonSet's agent container.
	AgentContainer = "agent"
)

//go:embed manifests/*.yaml
var manifests embed.FS

// Manifest is one file of deploy/manifests.
type Manifest struct {
	// Name is the file name, e.g. "05-daemonset.yaml".
	Name string
	// Data is the file's content.
	Data []byte
}

// Manifests returns the plain manifests in the order `kubectl apply -f`
// applies them.
func Manifests() ([]Manifest, error) {
	names, err := fs.Glob(manifests, "manifests/*.yaml")
	if err != nil {
		return nil, fmt.Errorf("list embedded manifests: %w", err)
	}
	slices.Sort(names)
	out := make([]Manifest, 0, len(names))
	for _, n := range names {
		data, err := manifests.ReadFile(n)
		if err != nil {
			return nil, fmt.Errorf("read embedded manifest %s: %w", n, err)
		}
		out = append(out, Manifest{Name: path.Base(n), Data: data})
	}
	return out, nil
}

// Objects returns every object of the plain manifests, in apply order.
func Objects() ([]*unstructured.Unstructured, error) {
	ms, err := Manifests()
	if err != nil {
		return nil, err
	}
	var out []*unstructured.Unstructured
	for _, m := range ms {
		objs, err := DecodeObjects(m.Data)
		if err != nil {
			return nil, fmt.Errorf("manifest %s: %w", m.Name, err)
		}
		out = append(out, objs...)
	}
	return out, nil
}

// DecodeObjects decodes a stream of YAML (or JSON) documents; empty
// documents are skipped and every other one must name its apiVersion and
// kind.
func DecodeObjects(data []byte) ([]*unstructured.Unstructured, error) {
	dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(data), 4096)
	var out []*unstructured.Unstructured
	for i := 0; ; i++ {
		var obj map[string]any
		if err := dec.Decode(&obj); errors.Is(err, io.EOF) {
			return out, nil
		} else if err != nil {
			return nil, fmt.Errorf("decode document %d: %w", i, err)
		}
		if len(obj) == 0 {
			continue
		}
		u := &unstructured.Unstructured{Object: obj}
		if u.GetAPIVersion() == "" || u.GetKind() == "" {
			return nil, fmt.Errorf("document %d has no apiVersion or kind", i)
		}
		out = append(out, u)
	}
}

// object finds one object of the manifests and converts it, rejecting
// fields the Go type does not know.
func object(kind, name string, into any) error {
	objs, err := Objects()
	if err != nil {
		return err
	}
	for _, o := range objs {
		if o.GetKind() == kind && o.GetName() == name {
			if err := runtime.DefaultUnstructuredConverter.FromUnstructuredWithValidation(o.Object, into, true); err != nil {
				return fmt.Errorf("convert %s %s: %w", kind, name, err)
			}
			return nil
		}
	}
	return fmt.Errorf("no %s %s in the manifests", kind, name)
}

// AgentDaemonSet returns the veil-agent DaemonSet of the manifests.
func AgentDaemonSet() (*appsv1.DaemonSet, error) {
	ds := &appsv1.DaemonSet{}
	if err := object("DaemonSet", DaemonSetName, ds); err != nil {
		return nil, err
	}
	return ds, nil
}

// ConfigMap returns the veil-config ConfigMap of the manifests.
func ConfigMap() (*corev1.ConfigMap, error) {
	cm := &corev1.ConfigMap{}
	if err := object("ConfigMap", ConfigMapName, cm); err != nil {
		return nil, err
	}
	return cm, nil
}

// AgentInvocation returns what kubelet would run in the agent container on
// the node nodeName: argv is the container's command followed by its args
// (argv[0] is the binary's path inside the image), env is its environment
// as NAME=value, in the container's order, with ConfigMap references
// resolved from the manifests' veil-config and the downward-API
// spec.nodeName as nodeName. overrides replace variables of the same name
// and add the others, sorted by name, after the container's own; a variable
// that is overridden is not resolved, so overrides may stand in for sources
// outside the manifests. nodeName may be empty only if NODE_NAME is
// overridden.
func AgentInvocation(nodeName string, overrides map[string]string) (argv, env []string, err error) {
	ds, err := AgentDaemonSet()
	if err != nil {
		return nil, nil, err
	}
	cm, err := ConfigMap()
	if err != nil {
		return nil, nil, err
	}
	return invocation(ds, cm, nodeName, overrides)
}

func invocation(ds *appsv1.DaemonSet, cm *corev1.ConfigMap, nodeName string, overrides map[string]string) ([]string, []string, error) {
	i := slices.IndexFunc(ds.Spec.Template.Spec.Containers, func(c corev1.Container) bool { return c.Name == AgentContainer })
	if i < 0 {
		return nil, nil, fmt.Errorf("DaemonSet %s has no container %q", ds.Name, AgentContainer)
	}
	c := ds.Spec.Template.Spec.Containers[i]
	if len(c.Command) == 0 {
		return nil, nil, fmt.Errorf("container %q has no command: the lab cannot know the image's entrypoint", c.Name)
	}
	argv := slices.Concat(c.Command, c.Args)
	for _, a := range argv {
		if strings.Contains(a, "$(") {
			return nil, nil, fmt.Errorf("container %q: argument %q uses $(VAR) expansion, which AgentInvocation does not do", c.Name, a)
		}
	}

	var env []string
	seen := map[string]bool{}
	add := func(name, value string) {
		env = append(env, name+"="+value)
		seen[name] = true
	}
	for _, from := range c.EnvFrom {
		if from.ConfigMapRef == nil || from.ConfigMapRef.Name != cm.Name {
			return nil, nil, fmt.Errorf("container %q: envFrom other than ConfigMap %s is not supported", c.Name, cm.Name)
		}
		for _, k := range slices.Sorted(maps.Keys(cm.Data)) {
			name := from.Prefix + k
			if v, ok := overrides[name]; ok {
				add(name, v)
			} else {
				add(name, cm.Data[k])
			}
		}
	}
	for _, e := range c.Env {
		if v, ok := overrides[e.Name]; ok {
			add(e.Name, v)
			continue
		}
		v, ok, err := resolve(e, cm, nodeName)
		if err != nil {
			return nil, nil, fmt.Errorf("container %q: env %s: %w", c.Name, e.Name, err)
		}
		if ok {
			add(e.Name, v)
		}
	}
	for _, name := range slices.Sorted(maps.Keys(overrides)) {
		if !seen[name] {
			add(name, overrides[name])
		}
	}
	return argv, env, nil
}

// resolve returns an env var's value, and false for an optional reference
// that does not resolve (kubelet leaves such a variable unset).
func resolve(e corev1.EnvVar, cm *corev1.ConfigMap, nodeName string) (string, bool, error) {
	if e.ValueFrom == nil {
		if strings.Contains(e.Value, "$(") {
			return "", false, fmt.Errorf("value %q uses $(VAR) expansion, which AgentInvocation does not do", e.Value)
		}
		return e.Value, true, nil
	}
	switch src := e.ValueFrom; {
	case src.FieldRef != nil:
		if src.FieldRef.FieldPath != "spec.nodeName" {
			return "", false, fmt.Errorf("field %s is not known outside a pod: pass it in overrides", src.FieldRef.FieldPath)
		}
		if nodeName == "" {
			return "", false, errors.New("node name is empty")
		}
		return nodeName, true, nil
	case src.ConfigMapKeyRef != nil:
		ref := src.ConfigMapKeyRef
		if ref.Name != cm.Name {
			return "", false, fmt.Errorf("ConfigMap %s is not in the manifests", ref.Name)
		}
		v, ok := cm.Data[ref.Key]
		if !ok {
			if ref.Optional != nil && *ref.Optional {
				return "", false, nil
			}
			return "", false, fmt.Errorf("ConfigMap %s has no key %q", cm.Name, ref.Key)
		}
		return v, true, nil
	default:
		return "", false, errors.New("only values, spec.nodeName and ConfigMap keys are resolved: pass it in overrides")
	}
}
