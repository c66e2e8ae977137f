package policysync

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	corelisters "k8s.io/client-go/listers/core/v1"
	networkinglisters "k8s.io/client-go/listers/networking/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"

	"github.com/veilmesh/veil/agent/encryption"
	"github.com/veilmesh/veil/agent/endpoints"
	"github.com/veilmesh/veil/agent/k8s"
	"github.com/veilmesh/veil/agent/wireguard"
	veillisters "github.com/veilmesh/veil/api/client/listers/policy/v1alpha1"
	"github.com/veilmesh/veil/api/policy/v1alpha1"
	"github.com/veilmesh/veil/policy"
	"github.com/veilmesh/veil/tests/scaleshape"
)

// syntheticCluster is the shape of tests/scale's cluster, built straight
// into informer indexers (no API server): 30 pods a node in 500
// namespaces, ten apps each in three tiers, every 20th pod with a unique
// label, two NetworkPolicies a namespace and a MeshPolicy in the first 100.
type syntheticCluster struct {
	listers k8s.Listers
	// pods is the indexer behind listers.Pods.
	pods cache.Indexer
	keys []k8s.Key
	// local are the first pods of node 0, restored as endpoints.
	local []*endpoints.Endpoint
}

const (
	synthNamespaces = 500
	synthPerNode    = 30
	synthApps       = 10
)

func newSyntheticCluster(tb testing.TB, pods, local int) *syntheticCluster {
	tb.Helper()
	sc := &syntheticCluster{}
	add := func(idx cache.Indexer, obj any) {
		if err := idx.Add(obj); err != nil {
			tb.Fatal(err)
		}
	}
	nsIdx := cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{})
	npIdx := cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc})
	mpIdx := cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc})
	tcp := corev1.ProtocolTCP
	for i := range synthNamespaces {
		ns := fmt.Sprintf("team-%03d", i)
		add(nsIdx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns, Labels: map[string]string{
			"team": fmt.Sprintf("t%02d", i%20), "env": []string{"prod", "staging", "dev"}[i%3],
		}}})
		sc.keys = append(sc.keys, k8s.Key{Kind: k8s.Namespace, Name: ns})
		metrics := intstr.FromString("metrics")
		p8080 := intstr.FromInt32(8080)
		for _, np := range []*networkingv1.NetworkPolicy{
			{
				ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "default-deny"},
				Spec:       networkingv1.NetworkPolicySpec{PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}},
			},
			{
				ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "allow-api"},
				Spec: networkingv1.NetworkPolicySpec{
					PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"tier": "api"}},
					Ingress: []networkingv1.NetworkPolicyIngressRule{{
						From: []networkingv1.NetworkPolicyPeer{
							{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"tier": "web"}}},
							{NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"team": fmt.Sprintf("t%02d", (i+1)%20)}}},
						},
						Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: &p8080}, {Protocol: &tcp, Port: &metrics}},
					}},
				},
			},
		} {
			add(npIdx, np)
			sc.keys = append(sc.keys, k8s.Key{Kind: k8s.NetworkPolicy, Namespace: ns, Name: np.Name})
		}
		if i < 100 {
			p22 := intstr.FromInt32(22)
			mp := &v1alpha1.MeshPolicy{
				ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "deny-dev-ssh"},
				Spec: v1alpha1.MeshPolicySpec{
					PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"tier": "db"}},
					PolicyRules: v1alpha1.PolicyRules{IngressDeny: []v1alpha1.IngressRule{{
						From:  []v1alpha1.Peer{{NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"env": "dev"}}}},
						Ports: []v1alpha1.PortRule{{Protocol: v1alpha1.Protocol("TCP"), Port: &p22}},
					}}},
				},
			}
			// Accepted already, as after the agent's last run: the
			// convergence writes no status.
			mp.Status.Conditions = []metav1.Condition{acceptedCondition(nil, 0)}
			add(mpIdx, mp)
			sc.keys = append(sc.keys, k8s.Key{Kind: k8s.MeshPolicy, Namespace: ns, Name: mp.Name})
		}
	}
	nodeIdx := cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{})
	nodes := (pods + synthPerNode - 1) / synthPerNode
	for i := range nodes {
		k, err := wgtypes.GeneratePrivateKey()
		if err != nil {
			tb.Fatal(err)
		}
		name := fmt.Sprintf("scale-node-%d", i)
		cidr := scaleshape.PodCIDR(i)
		add(nodeIdx, &corev1.Node{
			ObjectMeta: metav1.ObjectMeta{
				Name: name, CreationTimestamp: metav1.Unix(int64(i), 0),
				Annotations: wireguard.Annotations(k.PublicKey(), netip.AddrPortFrom(scaleshape.NodeIP(i), 51820), []netip.Prefix{cidr}),
			},
			Spec:   corev1.NodeSpec{PodCIDR: cidr.String(), PodCIDRs: []string{cidr.String()}},
			Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: scaleshape.NodeIP(i).String()}}},
		})
		sc.keys = append(sc.keys, k8s.Key{Kind: k8s.Node, Name: name})
	}
	podIdx := cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{})
	labelSets := map[string]map[string]string{}
	ports := []k8s.NamedPort{{Container: "app", Name: "http", Port: 8080, Protocol: tcp}, {Container: "app", Name: "metrics", Port: 9090, Protocol: tcp}}
	for k := range pods {
		nsi, node, slot := k%synthNamespaces, k/synthPerNode, k%synthPerNode
		app := (k/synthNamespaces + k) % synthApps
		ls := map[string]string{
			"app": fmt.Sprintf("a%d", app), "tier": []string{"web", "api", "db"}[app%3], "version": "v1",
			"pod-template-hash": fmt.Sprintf("%08x", nsi*synthApps+app),
		}
		name := fmt.Sprintf("pod-%06d", k)
		if k%20 == 0 {
			ls["statefulset.kubernetes.io/pod-name"] = name
		}
		// Interned, as the informer's transform does.
		key := fmt.Sprint(ls)
		if shared, ok := labelSets[key]; ok {
			ls = shared
		} else {
			labelSets[key] = ls
		}
		ip := scaleshape.PodIP(node, slot).String()
		ns := fmt.Sprintf("team-%03d", nsi)
		pi := k8s.NewPodInfo(k8s.PodFields{
			Namespace: ns, Name: name, ResourceVersion: "1", Labels: ls,
			NodeName: fmt.Sprintf("scale-node-%d", node), ServiceAccount: "default", Phase: corev1.PodRunning,
			PodIP: ip, PodIPs: []string{ip}, Ports: ports,
		})
		add(podIdx, pi)
		sc.keys = append(sc.keys, k8s.Key{Kind: k8s.Pod, Namespace: ns, Name: name})
		if node == 0 && slot < local {
			sc.local = append(sc.local, &endpoints.Endpoint{
				Pod: policy.EndpointID{Namespace: ns, Name: name}, ContainerID: name, ID: uint32(slot + 1),
				IP: scaleshape.PodIP(node, slot), HostMAC: "02:00:00:00:00:01", PodMAC: "02:00:00:00:00:02",
			})
		}
	}
	sc.pods = podIdx
	sc.listers = k8s.Listers{
		Pods:                k8s.NewPodStore(podIdx),
		Namespaces:          corelisters.NewNamespaceLister(nsIdx),
		Nodes:               corelisters.NewNodeLister(nodeIdx),
		NetworkPolicies:     networkinglisters.NewNetworkPolicyLister(npIdx),
		MeshPolicies:        veillisters.NewMeshPolicyLister(mpIdx),
		ClusterMeshPolicies: veillisters.NewClusterMeshPolicyLister(cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{})),
	}
	return sc
}

// syncer is a node-local agent's syncer for node 0 of the cluster, with
// its local endpoints restored, every key queued as at start.
func (sc *syntheticCluster) syncer(tb testing.TB, dp Datapath) (*Syncer, *endpoints.Registry) {
	tb.Helper()
	c, err := policy.New(policy.Options{Node: "scale-node-0"})
	if err != nil {
		tb.Fatal(err)
	}
	reg := endpoints.New(endpoints.Config{StateDir: tb.TempDir()})
	reg.Restore(sc.local)
	s := New(Config{
		NodeName: "scale-node-0", NodeIP: scaleshape.NodeIP(0), ClusterCIDRs: []netip.Prefix{netip.MustParsePrefix(scaleshape.ClusterCIDR)},
		Compiler: c, Datapath: dp, Endpoints: reg, Encryption: encryption.New(encryption.Config{NodeName: "scale-node-0"}),
		Listers: sc.listers, Events: record.NewFakeRecorder(16), Degraded: &fakeDegraded{},
	})
	for _, k := range sc.keys {
		s.Enqueue(k)
	}
	return s, reg
}

// BenchmarkFirstConvergence is the agent's first convergence after a
// start, as tests/scale's node-local-resume measures it with a real API
// server, without one: every object of a cluster of
// VEIL_BENCH_PODS pods (default 150,000) already cached, queued, and
// synced until the agent converged and the syncer is idle.
func BenchmarkFirstConvergence(b *testing.B) {
	pods := 150000
	if v := os.Getenv("VEIL_BENCH_PODS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil {
			b.Fatalf("VEIL_BENCH_PODS: %v", err)
		}
		pods = n
	}
	sc := newSyntheticCluster(b, pods, 20)
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		b.StopTimer()
		dp := newFakeDatapath()
		s, reg := sc.syncer(b, dp)
		ctx, cancel := context.WithCancel(context.Background())
		b.StartTimer()
		done := make(chan struct{})
		go func() { defer close(done); s.Run(ctx) }()
		for !(reg.Converged() && s.Idle()) {
			time.Sleep(time.Millisecond)
		}
		b.StopTimer()
		cancel()
		<-done
		if got := s.IPCacheSize(); got < pods {
			b.Fatalf("ipcache holds %d entries for %d pods", got, pods)
		}
	}
}
