package k8s

import (
	"context"
	"fmt"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"
	"unsafe"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	kubefake "k8s.io/client-go/kubernetes/fake"

	"github.com/veilmesh/veil/api/annotations"
	veilfake "github.com/veilmesh/veil/api/client/clientset/versioned/fake"
	"github.com/veilmesh/veil/api/nodeinfo"
	"github.com/veilmesh/veil/policy"
)

func fullPod(name, node, ip string, labels map[string]string) *corev1.Pod {
	now := metav1.Now()
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: "demo", Name: name, UID: "u-" + "name", ResourceVersion: "42", Labels: labels,
			Annotations: map[string]string{
				"kubectl.kubernetes.io/last-applied-configuration": `{"big":"blob"}`,
				annotations.SocketAcceleration:                     "false",
			},
			ManagedFields:   []metav1.ManagedFieldsEntry{{Manager: "kubectl", Operation: metav1.ManagedFieldsOperationApply}},
			OwnerReferences: []metav1.OwnerReference{{Kind: "ReplicaSet", Name: "rs"}},
		},
		Spec: corev1.PodSpec{
			NodeName: node, ServiceAccountName: "sa",
			Containers: []corev1.Container{{
				Name: "app", Image: "app:1", Args: []string{"--x"},
				Ports:     []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}, {ContainerPort: 9000}, {Name: "dns", ContainerPort: 53, Protocol: corev1.ProtocolUDP}},
				Env:       []corev1.EnvVar{{Name: "A", Value: "b"}},
				Resources: corev1.ResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("1")}},
			}, {Name: "sidecar", Image: "side:1"}},
			Volumes: []corev1.Volume{{Name: "v"}},
		},
		Status: corev1.PodStatus{
			Phase: corev1.PodRunning, PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}}, HostIP: "192.0.2.1",
			Conditions:        []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue, LastTransitionTime: now}},
			ContainerStatuses: []corev1.ContainerStatus{{Name: "app", Ready: true}},
		},
	}
}

// What the compiler makes of slimmed pods and namespaces, and what
// nodeinfo parses of a slimmed Node, equals what it makes of the full
// objects; the rest is gone.
func TestTransformKeepsWhatVeilReads(t *testing.T) {
	tr := &transformer{}
	pods := []*corev1.Pod{
		fullPod("a", "n1", "10.244.1.5", map[string]string{"app": "a"}),
		fullPod("b", "n2", "10.244.2.5", map[string]string{"app": "b", "tier": "db"}),
	}
	hostNet := fullPod("h", "n1", "192.0.2.1", nil)
	hostNet.Spec.HostNetwork = true
	done := fullPod("d", "n1", "10.244.1.9", map[string]string{"app": "a"})
	done.Status.Phase = corev1.PodSucceeded
	pods = append(pods, hostNet, done)
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "demo", Labels: map[string]string{"team": "x"}, Annotations: map[string]string{"a": "b"}},
		Status: corev1.NamespaceStatus{Phase: corev1.NamespaceActive}}
	tcp := corev1.ProtocolTCP
	np := &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: "demo", Name: "np", ManagedFields: []metav1.ManagedFieldsEntry{{Manager: "kubectl"}}},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "a"}},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{
				From:  []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"tier": "db"}}}},
				Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: ptr(intOrString("http"))}},
			}},
			Egress: []networkingv1.NetworkPolicyEgressRule{{
				Ports: []networkingv1.NetworkPolicyPort{{Protocol: ptr(corev1.ProtocolUDP), Port: ptr(intOrString("dns"))}},
			}},
		},
	}

	var slimPods []*corev1.Pod
	for _, p := range pods {
		o, err := tr.transform(p.DeepCopy())
		if err != nil {
			t.Fatal(err)
		}
		sp := o.(*PodInfo).Object()
		if sp.ManagedFields != nil || sp.Status.Conditions != nil || sp.Spec.Volumes != nil || sp.Spec.Containers[0].Image != "" ||
			sp.Spec.Containers[0].Env != nil || len(sp.Spec.Containers[0].Ports) != 2 || sp.OwnerReferences != nil {
			t.Errorf("slimmed pod %s keeps what Veil never reads: %+v", p.Name, sp)
		}
		if _, ok := sp.Annotations["kubectl.kubernetes.io/last-applied-configuration"]; ok {
			t.Errorf("slimmed pod %s keeps a foreign annotation", p.Name)
		}
		if sp.Annotations[annotations.SocketAcceleration] != "false" {
			t.Errorf("slimmed pod %s lost the acceleration opt-out: %v", p.Name, sp.Annotations)
		}
		slimPods = append(slimPods, sp)
	}
	sns, _ := tr.transform(ns.DeepCopy())
	snp, _ := tr.transform(np.DeepCopy())
	if snp.(*networkingv1.NetworkPolicy).ManagedFields != nil {
		t.Error("slimmed NetworkPolicy keeps its managed fields")
	}

	full, err := policy.Compile(policy.Input{Pods: pods, Namespaces: []*corev1.Namespace{ns}, NetworkPolicies: []*networkingv1.NetworkPolicy{np}}, policy.Options{})
	if err != nil {
		t.Fatal(err)
	}
	slim, err := policy.Compile(policy.Input{Pods: slimPods, Namespaces: []*corev1.Namespace{sns.(*corev1.Namespace)}, NetworkPolicies: []*networkingv1.NetworkPolicy{snp.(*networkingv1.NetworkPolicy)}}, policy.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := slim.Endpoints(), full.Endpoints(); !reflect.DeepEqual(got, want) || len(want) != 2 {
		t.Errorf("endpoints compiled from slimmed objects:\n%+v\nwant (from full objects, two of them):\n%+v", got, want)
	}
	if got, want := slim.IPCache(), full.IPCache(); !reflect.DeepEqual(got, want) {
		t.Errorf("ipcache from slimmed objects %+v, want %+v", got, want)
	}

	node := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: "n1", CreationTimestamp: metav1.Now(), Labels: map[string]string{"zone": "a"}, Annotations: map[string]string{
			annotations.WireGuardPublicKey: "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAE=", annotations.WireGuardEndpoint: "192.0.2.1:51820",
			annotations.WireGuardPodCIDRs: "10.244.1.0/24", "node.alpha.kubernetes.io/ttl": "0",
		}},
		Spec: corev1.NodeSpec{PodCIDR: "10.244.1.0/24", PodCIDRs: []string{"10.244.1.0/24"}},
		Status: corev1.NodeStatus{
			Addresses:  []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "192.0.2.1"}, {Type: corev1.NodeHostName, Address: "n1"}},
			Conditions: []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue}},
			Images:     []corev1.ContainerImage{{Names: []string{"x"}}},
		},
	}
	o, _ := tr.transform(node.DeepCopy())
	sn := o.(*corev1.Node)
	if sn.Status.Conditions != nil || sn.Status.Images != nil || len(sn.Annotations) != 3 {
		t.Errorf("slimmed node keeps what Veil never reads: %+v", sn)
	}
	want, werr := nodeinfo.Parse(node)
	got, gerr := nodeinfo.Parse(sn)
	if werr != nil || gerr != nil || !got.Equal(want) || !got.Created.Equal(want.Created) {
		t.Errorf("nodeinfo of the slimmed node %+v (%v), want %+v (%v)", got, gerr, want, werr)
	}
	if !equality.Semantic.DeepEqual(sn.Spec, node.Spec) {
		t.Errorf("slimmed node spec %+v, want %+v", sn.Spec, node.Spec)
	}
}

func ptr[T any](v T) *T { return &v }

func intOrString(s string) intstr.IntOrString { return intstr.FromString(s) }

func mapID(m map[string]string) uintptr { return reflect.ValueOf(m).Pointer() }

// Pods with equal labels share one map; a set unused for two generations
// is forgotten, so the interner does not grow with every set ever seen.
func TestLabelInternerShares(t *testing.T) {
	var in labelInterner
	a := in.intern(map[string]string{"app": "a", "tier": "web"})
	b := in.intern(map[string]string{"tier": "web", "app": "a"})
	c := in.intern(map[string]string{"app": "a", "tier": "db"})
	if mapID(a) != mapID(b) {
		t.Error("equal label sets were not shared")
	}
	if mapID(a) == mapID(c) || c["tier"] != "db" {
		t.Errorf("different label sets shared: %v %v", a, c)
	}
	// Different sets share one string of a label key.
	keyData := func(m map[string]string, key string) *byte {
		for k := range m {
			if k == key {
				return unsafe.StringData(k)
			}
		}
		return nil
	}
	e := in.intern(map[string]string{strings.Clone("tier"): "x"})
	if keyData(a, "tier") != keyData(e, "tier") {
		t.Error("two label sets hold separate copies of the key tier")
	}
	if in.intern(nil) != nil || in.intern(map[string]string{}) != nil {
		t.Error("an empty label set interned as a map")
	}
	// Keys and values must not run together: a=bc and ab=c differ.
	if x, y := in.intern(map[string]string{"a": "bc"}), in.intern(map[string]string{"ab": "c"}); mapID(x) == mapID(y) {
		t.Error("label sets a=bc and ab=c shared one map")
	}
	for i := range 3 * minGeneration {
		in.intern(map[string]string{"n": fmt.Sprint(i)})
	}
	if in.sets.len() > 2*minGeneration {
		t.Errorf("interner holds %d sets after %d distinct ones, want at most %d", in.sets.len(), 3*minGeneration, 2*minGeneration)
	}
	if d := in.intern(map[string]string{"app": "a", "tier": "web"}); mapID(d) == mapID(a) {
		t.Error("a set unused for two generations is still interned")
	}
}

// The Watcher's caches hold slimmed objects, unless FullObjects.
func TestWatcherCachesSlimObjects(t *testing.T) {
	for _, fullObjects := range []bool{false, true} {
		t.Run(fmt.Sprintf("FullObjects=%v", fullObjects), func(t *testing.T) {
			kube := kubefake.NewClientset(fullPod("a", "n1", "10.244.1.5", map[string]string{"app": "a"}), fullPod("b", "n1", "10.244.1.6", map[string]string{"app": "a"}))
			w := NewWithOptions(kube, veilfake.NewSimpleClientset(), Options{FullObjects: fullObjects})
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			w.Start(ctx)
			if err := w.WaitForCacheSync(ctx, time.Hour, func([]string) {}); err != nil {
				t.Fatal(err)
			}
			a, err := w.Pods.Get("demo", "a")
			if err != nil {
				t.Fatal(err)
			}
			b, err := w.Pods.Get("demo", "b")
			if err != nil {
				t.Fatal(err)
			}
			cached, _, _ := w.informers[Pod].GetStore().GetByKey("demo/a")
			if _, compact := cached.(*PodInfo); compact == fullObjects {
				t.Errorf("cached pod is a %T with FullObjects=%v", cached, fullObjects)
			}
			if a.Object().Spec.Containers[0].Ports[0].Name != "http" || a.Annotations()[annotations.SocketAcceleration] != "false" {
				t.Errorf("pod read from the cache lost what Veil reads: %+v", a)
			}
			if shared := mapID(a.Labels()) == mapID(b.Labels()); shared == fullObjects {
				t.Errorf("equal labels of two cached pods shared=%v with FullObjects=%v", shared, fullObjects)
			}
		})
	}
}

// With slim caches, an update that changes only what Veil never reads
// (a pod's conditions, a node's heartbeat) queues nothing; one that
// changes what it reads does, and so does a resync (same version). With
// FullObjects every update queues.
func TestUpdatesOfUnreadFieldsQueueNothing(t *testing.T) {
	for _, fullObjects := range []bool{false, true} {
		t.Run(fmt.Sprintf("FullObjects=%v", fullObjects), func(t *testing.T) {
			pod := fullPod("a", "n1", "10.244.1.5", map[string]string{"app": "a"})
			pod.ResourceVersion = "1"
			node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n1", ResourceVersion: "1"},
				Status: corev1.NodeStatus{Conditions: []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue}}}}
			var (
				mu   sync.Mutex
				keys []Key
			)
			// The handlers as OnChange registers them.
			w := NewWithOptions(kubefake.NewClientset(), veilfake.NewSimpleClientset(), Options{FullObjects: fullObjects})
			h := handler{kind: Pod, fn: func(k Key) { mu.Lock(); keys = append(keys, k); mu.Unlock() }, skipUnread: w.slim}
			hn := handler{kind: Node, fn: h.fn, skipUnread: w.slim}
			tr := &transformer{}
			slim := func(o any) any {
				if fullObjects {
					return o
				}
				s, _ := tr.transform(o)
				return s
			}
			count := func() int { mu.Lock(); defer mu.Unlock(); return len(keys) }

			conds := pod.DeepCopy()
			conds.ResourceVersion = "2"
			conds.Status.Conditions[0].Status = corev1.ConditionFalse
			h.OnUpdate(slim(pod.DeepCopy()), slim(conds))
			beat := node.DeepCopy()
			beat.ResourceVersion = "2"
			beat.Status.Conditions[0].LastHeartbeatTime = metav1.Now()
			hn.OnUpdate(slim(node.DeepCopy()), slim(beat))
			want := 0
			if fullObjects {
				want = 2
			}
			if n := count(); n != want {
				t.Errorf("updates of unread fields queued %d keys, want %d", n, want)
			}

			relabel := conds.DeepCopy()
			relabel.ResourceVersion = "3"
			relabel.Labels = map[string]string{"app": "b"}
			h.OnUpdate(slim(conds), slim(relabel))
			resync := slim(relabel.DeepCopy())
			h.OnUpdate(resync, resync)
			if n := count(); n != want+2 {
				t.Errorf("a relabel and a resync queued %d keys, want %d", n-want, 2)
			}
		})
	}
}

// Pods with equal named ports share one slice, as equal label sets share
// one map; different lists (by container, name, port or protocol) do not.
func TestPortsInternerShares(t *testing.T) {
	tr := &transformer{}
	info := func(name string, mutate func(*corev1.Pod)) *PodInfo {
		p := fullPod(name, "n1", "10.244.1.5", map[string]string{"app": "a"})
		if mutate != nil {
			mutate(p)
		}
		o, err := tr.transform(p)
		if err != nil {
			t.Fatal(err)
		}
		return o.(*PodInfo)
	}
	a, b := info("a", nil), info("b", nil)
	if len(a.Ports()) == 0 || &a.Ports()[0] != &b.Ports()[0] {
		t.Errorf("equal named ports not shared: %v %v", a.Ports(), b.Ports())
	}
	for _, m := range []func(*corev1.Pod){
		func(p *corev1.Pod) { p.Spec.Containers[0].Ports[0].ContainerPort++ },
		func(p *corev1.Pod) { p.Spec.Containers[0].Ports[0].Protocol = corev1.ProtocolUDP },
		func(p *corev1.Pod) { p.Spec.Containers[0].Name += "x" },
		func(p *corev1.Pod) { p.Spec.Containers[0].Ports[0].Name += "x" },
	} {
		c := info("c", m)
		if &c.Ports()[0] == &a.Ports()[0] || reflect.DeepEqual(c.Ports(), a.Ports()) {
			t.Errorf("different named ports shared or equal: %v %v", c.Ports(), a.Ports())
		}
	}
	if d := info("d", func(p *corev1.Pod) { p.Spec.Containers = nil }); d.Ports() != nil {
		t.Errorf("a pod without named ports got %v", d.Ports())
	}
	if a2 := info("a2", nil); &a2.Ports()[0] != &a.Ports()[0] {
		t.Error("the first list is no longer shared")
	}
}
