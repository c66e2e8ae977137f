package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/yaml"

	"github.com/veilmesh/veil/meshctl/cli"
)

// matrixPorts are probed for real; SCTP is predicted by meshctl but cannot
// be served here (this kernel has no SCTP module), so the datapath's SCTP
// handling is proven at the datapath level (agent/datapath tests) instead.
var matrixPorts = []string{"80/TCP", "81/TCP", "80/UDP", "81/UDP"}

type cell struct {
	From    string `json:"from"`
	To      string `json:"to"`
	Port    string `json:"port"`
	Allowed bool   `json:"allowed"`
}

// predict runs `meshctl policy matrix` on the cluster's objects, dumped to
// manifest files as a user would.
func (e *env) predict(t *testing.T, namespaces []string) map[string]bool {
	t.Helper()
	ctx := context.Background()
	dir := t.TempDir()
	dump := func(name string, obj any) {
		raw, err := yaml.Marshal(obj)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, name), raw, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	nss, err := e.kube.CoreV1().Namespaces().List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	nss.Kind, nss.APIVersion = "NamespaceList", "v1"
	for i := range nss.Items {
		nss.Items[i].Kind, nss.Items[i].APIVersion = "Namespace", "v1"
	}
	dump("namespaces.yaml", nss)
	for _, ns := range namespaces {
		pods, err := e.kube.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		pods.Kind, pods.APIVersion = "PodList", "v1"
		for i := range pods.Items {
			pods.Items[i].Kind, pods.Items[i].APIVersion = "Pod", "v1"
			pods.Items[i].ManagedFields = nil
		}
		dump("pods-"+ns+".yaml", pods)
		nps, err := e.kube.NetworkingV1().NetworkPolicies(ns).List(ctx, metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		nps.Kind, nps.APIVersion = "NetworkPolicyList", "networking.k8s.io/v1"
		for i := range nps.Items {
			nps.Items[i].Kind, nps.Items[i].APIVersion = "NetworkPolicy", "networking.k8s.io/v1"
			nps.Items[i].ManagedFields = nil
		}
		dump("netpols-"+ns+".yaml", nps)
	}
	args := []string{"policy", "matrix", "-f", dir, "-o", "json"}
	for _, p := range matrixPorts {
		args = append(args, "--port", p)
	}
	var out, errOut bytes.Buffer
	if code := cli.Main(args, cli.Streams{In: strings.NewReader(""), Out: &out, Err: &errOut}); code != 0 {
		t.Fatalf("meshctl policy matrix: exit %d: %s", code, errOut.String())
	}
	var m struct {
		Cells []cell `json:"cells"`
	}
	if err := json.Unmarshal(out.Bytes(), &m); err != nil {
		t.Fatalf("matrix JSON: %v: %s", err, out.String())
	}
	want := map[string]bool{}
	for _, c := range m.Cells {
		want[c.From+">"+c.To+"@"+c.Port] = c.Allowed
	}
	return want
}

// observe probes every cell on the real datapath: each pod probes all
// its cells at once (`client reach`), the pods side by side.
func observe(t *testing.T, pods []*pod) map[string]bool {
	t.Helper()
	got := map[string]bool{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, from := range pods {
		var targets, keys []string
		for _, to := range pods {
			if from == to {
				continue
			}
			for _, p := range matrixPorts {
				num, proto, _ := strings.Cut(p, "/")
				targets = append(targets, fmt.Sprintf("%s/%s:%s", strings.ToLower(proto), to.IP, num))
				keys = append(keys, from.Key()+">"+to.Key()+"@"+p)
			}
		}
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			out, code, err := from.run(ctx, append([]string{"/client", "reach", "-timeout", "500ms"}, targets...)...)
			lines := strings.Split(strings.TrimSpace(out), "\n")
			if err != nil || code != 0 || len(lines) != len(targets) {
				t.Errorf("reach from %s: exit %d, %v:\n%s", from.Key(), code, err, out)
				return
			}
			mu.Lock()
			defer mu.Unlock()
			for i, line := range lines {
				got[keys[i]] = line == targets[i]+" ok"
			}
		})
	}
	wg.Wait()
	return got
}

func diff(want, got map[string]bool) []string {
	var out []string
	for k, w := range want {
		if g, ok := got[k]; !ok || g != w {
			out = append(out, fmt.Sprintf("%s: meshctl says allowed=%v, datapath %v", k, w, g))
		}
	}
	sort.Strings(out)
	return out
}

func np(ns, name string, spec networkingv1.NetworkPolicySpec) *networkingv1.NetworkPolicy {
	return &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}, Spec: spec}
}

func sel(kv ...string) *metav1.LabelSelector {
	m := map[string]string{}
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	return &metav1.LabelSelector{MatchLabels: m}
}

// TestPrivilegedUpstreamMatrixOnTwoNodes runs upstream network-policy e2e
// scenarios on the real datapath and requires exactly the matrix meshctl
// predicts, cell for cell: 9 pods in 3 namespaces over node-1 and node-2.
func TestPrivilegedUpstreamMatrixOnTwoNodes(t *testing.T) {
	e := sharedEnv(t)
	ctx := context.Background()
	ports := []corev1.ContainerPort{
		{Name: "serve-80-tcp", ContainerPort: 80, Protocol: corev1.ProtocolTCP},
		{Name: "serve-81-tcp", ContainerPort: 81, Protocol: corev1.ProtocolTCP},
		{Name: "serve-80-udp", ContainerPort: 80, Protocol: corev1.ProtocolUDP},
		{Name: "serve-81-udp", ContainerPort: 81, Protocol: corev1.ProtocolUDP},
	}
	// Namespaces mx-x, mx-y, mx-z, labelled ns=x|y|z for the policies.
	nsName := map[string]string{}
	var specs []podSpec
	i := 0
	for _, ns := range []string{"x", "y", "z"} {
		nsName[ns] = e.namespace(t, "mx-"+ns, map[string]string{"ns": ns})
		for _, name := range []string{"a", "b", "c"} {
			specs = append(specs, podSpec{Namespace: nsName[ns], Name: name, Node: e.c.Nodes[i%2].Name, Labels: map[string]string{"pod": name}, Ports: ports})
			i++
		}
	}
	pods := e.addPods(t, specs...)
	namespaces := []string{nsName["x"], nsName["y"], nsName["z"]}
	port80 := intstr.FromInt32(80)
	named := intstr.FromString("serve-81-udp")
	scenarios := []struct {
		name     string
		policies []*networkingv1.NetworkPolicy
	}{
		{"no policy", nil},
		{"deny all ingress in x", []*networkingv1.NetworkPolicy{
			np("x", "deny-all", networkingv1.NetworkPolicySpec{PodSelector: metav1.LabelSelector{}}),
		}},
		{"allow x/a from namespace y on 80/TCP", []*networkingv1.NetworkPolicy{
			np("x", "allow-a-from-y", networkingv1.NetworkPolicySpec{
				PodSelector: *sel("pod", "a"),
				Ingress: []networkingv1.NetworkPolicyIngressRule{{
					From:  []networkingv1.NetworkPolicyPeer{{NamespaceSelector: sel("ns", "y")}},
					Ports: []networkingv1.NetworkPolicyPort{{Port: &port80}},
				}},
			}),
		}},
		{"namespace and pod selector together, named UDP port", []*networkingv1.NetworkPolicy{
			np("x", "b-from-z-c", networkingv1.NetworkPolicySpec{
				PodSelector: *sel("pod", "b"),
				Ingress: []networkingv1.NetworkPolicyIngressRule{{
					From:  []networkingv1.NetworkPolicyPeer{{NamespaceSelector: sel("ns", "z"), PodSelector: sel("pod", "c")}},
					Ports: []networkingv1.NetworkPolicyPort{{Port: &named, Protocol: ptr(corev1.ProtocolUDP)}},
				}},
			}),
		}},
		{"egress deny in y except to z", []*networkingv1.NetworkPolicy{
			np("y", "egress-to-z", networkingv1.NetworkPolicySpec{
				PodSelector: metav1.LabelSelector{},
				PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress},
				Egress: []networkingv1.NetworkPolicyEgressRule{{
					To: []networkingv1.NetworkPolicyPeer{{NamespaceSelector: sel("ns", "z")}},
				}},
			}),
		}},
	}
	for _, sc := range scenarios {
		// Each scenario replaces the previous one's policies.
		for _, ns := range namespaces {
			if err := e.kube.NetworkingV1().NetworkPolicies(ns).DeleteCollection(ctx, metav1.DeleteOptions{}, metav1.ListOptions{}); err != nil {
				t.Fatal(err)
			}
		}
		for _, p := range sc.policies {
			p = p.DeepCopy()
			p.Namespace = nsName[p.Namespace]
			if _, err := e.kube.NetworkingV1().NetworkPolicies(p.Namespace).Create(ctx, p, metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
		}
		want := e.predict(t, namespaces)
		if len(want) != len(pods)*(len(pods)-1)*len(matrixPorts) {
			t.Fatalf("%s: meshctl predicted %d cells", sc.name, len(want))
		}
		// Enforcement converges within a bounded time; then every cell
		// must agree.
		var bad []string
		for attempt := 0; attempt < 10; attempt++ {
			bad = diff(want, observe(t, pods))
			if len(bad) == 0 {
				break
			}
			time.Sleep(time.Second)
		}
		allowed := 0
		for _, v := range want {
			if v {
				allowed++
			}
		}
		t.Logf("%s: %d/%d cells allowed, datapath matches meshctl: %v", sc.name, allowed, len(want), len(bad) == 0)
		if len(bad) > 0 {
			t.Errorf("%s: %d cells differ:\n%s", sc.name, len(bad), strings.Join(bad, "\n"))
		}
	}
}
