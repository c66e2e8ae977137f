package policy

import (
	"fmt"
	"maps"
	"runtime"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/veilmesh/veil/api/policy/v1alpha1"
)

// benchInput is the measured scale: 10,000 pods in 100 namespaces (10 apps
// of 10 replicas each, so 1,000 identities) and 1,000 policies (900
// NetworkPolicies, 90 MeshPolicies, 10 ClusterMeshPolicies) mixing pod,
// namespace and CIDR peers, numeric, range and named ports.
func benchInput() Input {
	const namespaces, apps, replicas = 100, 10, 10
	var in Input
	tcp := corev1.ProtocolTCP
	for n := range namespaces {
		ns := fmt.Sprintf("ns-%d", n)
		in.Namespaces = append(in.Namespaces, testNamespace(ns, "team", fmt.Sprintf("t%d", n%10), "env", []string{"prod", "dev"}[n%2]))
		for a := range apps {
			for r := range replicas {
				i := (n*apps+a)*replicas + r
				ip := fmt.Sprintf("10.%d.%d.%d", i>>16, (i>>8)&0xff, i&0xff)
				p := testPod(ns, fmt.Sprintf("app-%d-%d", a, r), ip, map[string]string{"app": fmt.Sprintf("app-%d", a), "tier": []string{"web", "backend"}[a%2]},
					containerPort("http", 8080, corev1.ProtocolTCP), containerPort("metrics", 9090, corev1.ProtocolTCP))
				p.Spec.NodeName = fmt.Sprintf("node-%d", i%50)
				in.Pods = append(in.Pods, p)
			}
		}
		for k := range 9 {
			in.NetworkPolicies = append(in.NetworkPolicies, np(ns, fmt.Sprintf("np-%d", k), matchLabels("app", fmt.Sprintf("app-%d", k)), func(s *networkingv1.NetworkPolicySpec) {
				end := int32(8090)
				p := npPortOf(tcp, 8080)
				p.EndPort = &end
				s.Ingress = []networkingv1.NetworkPolicyIngressRule{
					{From: []networkingv1.NetworkPolicyPeer{{PodSelector: matchLabels("app", fmt.Sprintf("app-%d", k+1))}}, Ports: []networkingv1.NetworkPolicyPort{npPortOf(tcp, "http")}},
					{From: []networkingv1.NetworkPolicyPeer{{NamespaceSelector: matchLabels("team", fmt.Sprintf("t%d", k)), PodSelector: matchLabels("tier", "web")}}, Ports: []networkingv1.NetworkPolicyPort{p}},
					{From: []networkingv1.NetworkPolicyPeer{ipBlock(fmt.Sprintf("172.%d.0.0/16", 16+k), fmt.Sprintf("172.%d.1.0/24", 16+k))}},
				}
				if k%3 == 0 {
					s.Egress = []networkingv1.NetworkPolicyEgressRule{{To: []networkingv1.NetworkPolicyPeer{{NamespaceSelector: matchLabels("kubernetes.io/metadata.name", ns)}}}}
				}
			}))
		}
		if n >= 90 {
			continue
		}
		in.MeshPolicies = append(in.MeshPolicies, mp(ns, "mesh", matchLabels("tier", "backend"), v1alpha1.PolicyRules{
			IngressDeny: []v1alpha1.IngressRule{{From: []v1alpha1.Peer{entity(v1alpha1.EntityWorld)}}},
			Egress:      []v1alpha1.EgressRule{{To: []v1alpha1.Peer{entity(v1alpha1.EntityCluster)}}, {To: []v1alpha1.Peer{cidrPeer("0.0.0.0/0", "10.0.0.0/8")}, Ports: []v1alpha1.PortRule{meshPortOf(v1alpha1.ProtocolTCP, 443)}}},
		}))
	}
	for k := range 10 {
		in.ClusterMeshPolicies = append(in.ClusterMeshPolicies, cmpol(fmt.Sprintf("cmp-%d", k), matchLabels("team", fmt.Sprintf("t%d", k)), &metav1.LabelSelector{}, v1alpha1.PolicyRules{
			Mode:        []v1alpha1.Mode{v1alpha1.ModeEnforce, v1alpha1.ModeAudit}[k%2],
			IngressDeny: []v1alpha1.IngressRule{{From: []v1alpha1.Peer{podPeer(matchLabels("env", "dev"), matchLabels("app", "app-9"))}, Ports: []v1alpha1.PortRule{meshPortOf(v1alpha1.ProtocolTCP, 22)}}},
			Ingress:     []v1alpha1.IngressRule{{From: []v1alpha1.Peer{entity(v1alpha1.EntityHost)}}, {Ports: []v1alpha1.PortRule{icmpRule(8)}}},
			DefaultDeny: &v1alpha1.DefaultDeny{Ingress: ptr(false)},
		}))
	}
	return in
}

func heapInUse() uint64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

func BenchmarkCompileFromScratch(b *testing.B) {
	in := benchInput()
	if n := len(in.NetworkPolicies) + len(in.MeshPolicies) + len(in.ClusterMeshPolicies); n != 1000 || len(in.Pods) != 10000 {
		b.Fatalf("bench input has %d pods, %d policies", len(in.Pods), n)
	}
	before := heapInUse()
	c, err := Compile(in, Options{})
	if err != nil {
		b.Fatal(err)
	}
	state := heapInUse() - before
	entries := 0
	for _, ep := range c.Endpoints() {
		entries += len(ep.Entries)
	}
	identities := len(c.Identities())
	runtime.KeepAlive(c)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Compile(in, Options{}); err != nil {
			b.Fatal(err)
		}
	}
	// Reported after the loop: b.Loop resets user metrics when it starts.
	b.ReportMetric(float64(state)/(1<<20), "state-MiB")
	b.ReportMetric(float64(entries), "entries")
	b.ReportMetric(float64(identities), "identities")
}

// BenchmarkCompileIncrementalPodRelabel relabels one pod so that it gets an
// identity of its own (the expensive case: a new identity every selector
// must consider) and back.
func BenchmarkCompileIncrementalPodRelabel(b *testing.B) {
	in := benchInput()
	c, err := Compile(in, Options{})
	if err != nil {
		b.Fatal(err)
	}
	pods := []*corev1.Pod{in.Pods[4321].DeepCopy(), in.Pods[4321].DeepCopy()}
	pods[1].Labels = map[string]string{"app": "app-3", "tier": "web", "canary": "true"}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		i++
		c.UpsertPod(pods[i%2])
	}
}

// BenchmarkCompileIncrementalPolicyChange edits one NetworkPolicy back and
// forth (another port and another peer).
func BenchmarkCompileIncrementalPolicyChange(b *testing.B) {
	in := benchInput()
	c, err := Compile(in, Options{})
	if err != nil {
		b.Fatal(err)
	}
	p0 := in.NetworkPolicies[437].DeepCopy()
	p1 := p0.DeepCopy()
	p1.Spec.Ingress[0].Ports = []networkingv1.NetworkPolicyPort{npPortOf(corev1.ProtocolTCP, 8443)}
	p1.Spec.Ingress[1].From[0].NamespaceSelector = matchLabels("env", "prod")
	ps := []*networkingv1.NetworkPolicy{p0, p1}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		i++
		c.UpsertNetworkPolicy(ps[i%2])
	}
}

// BenchmarkCompileIncrementalPodRelabelExisting moves one pod between two
// existing identities: only the pod and the ipcache change.
func BenchmarkCompileIncrementalPodRelabelExisting(b *testing.B) {
	in := benchInput()
	c, err := Compile(in, Options{})
	if err != nil {
		b.Fatal(err)
	}
	pods := []*corev1.Pod{in.Pods[4321].DeepCopy(), in.Pods[4321].DeepCopy()}
	pods[1].Labels = maps.Clone(in.Pods[4331].Labels)
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		i++
		c.UpsertPod(pods[i%2])
	}
}

// BenchmarkCompileNodeLocal compiles the bench input for one of its 50
// nodes (Options.Node) and for the whole cluster side by side, and
// relabels a pod of another node to a new identity on each: it reports
// the node-local figures and their ratio to the whole cluster's.
func BenchmarkCompileNodeLocal(b *testing.B) {
	in := benchInput()
	pods := []*corev1.Pod{in.Pods[4321].DeepCopy(), in.Pods[4321].DeepCopy()}
	pods[1].Labels = map[string]string{"app": "app-3", "tier": "web", "canary": "true"}
	if pods[0].Spec.NodeName == "node-7" {
		b.Fatal("the relabelled pod must be on another node")
	}
	type figures struct {
		compile, relabel time.Duration
		state            uint64
		entries          int
	}
	measure := func(opts Options) figures {
		var f figures
		before := heapInUse()
		start := time.Now()
		c, err := Compile(in, opts)
		if err != nil {
			b.Fatal(err)
		}
		f.compile = time.Since(start)
		f.state = heapInUse() - before
		for _, ep := range c.Endpoints() {
			if ep.Node == "node-7" {
				f.entries += len(ep.Entries)
			}
		}
		start = time.Now()
		for i := range 20 {
			c.UpsertPod(pods[i%2])
		}
		f.relabel = time.Since(start) / 20
		runtime.KeepAlive(c)
		return f
	}
	var local, whole figures
	for b.Loop() {
		local, whole = measure(Options{Node: "node-7"}), measure(Options{})
	}
	if local.entries != whole.entries {
		b.Fatalf("node-7's endpoints have %d entries node-locally, %d compiled with the whole cluster", local.entries, whole.entries)
	}
	b.ReportMetric(float64(local.compile.Nanoseconds()), "local-compile-ns")
	b.ReportMetric(float64(local.state)/(1<<20), "local-state-MiB")
	b.ReportMetric(float64(local.relabel.Nanoseconds()), "local-relabel-ns")
	b.ReportMetric(float64(whole.compile)/float64(local.compile), "compile-whole/local")
	b.ReportMetric(float64(whole.state)/float64(local.state), "state-whole/local")
	b.ReportMetric(float64(whole.relabel)/float64(local.relabel), "relabel-whole/local")
}
