package policy

import (
	"unsafe"

	"fmt"
	"reflect"
	"testing"

	corev1 "k8s.io/api/core/v1"
)

// An identity keeps a caller's label set as it is when the caller says
// nobody writes it (LabelsShared: the agent's interned sets), and a copy
// otherwise, so a caller that writes its map afterwards changes nothing.
func TestIdentityLabelsSharedOrCopied(t *testing.T) {
	for _, shared := range []bool{false, true} {
		c, err := New(Options{})
		if err != nil {
			t.Fatal(err)
		}
		ls := map[string]string{"app": "a"}
		c.UpsertPodFacts(PodFacts{Namespace: "x", Name: "a", Labels: ls, LabelsShared: shared, NodeName: "n1", IPs: []string{"10.0.0.1"}})
		p := c.pods.get(EndpointID{"x", "a"})
		if p == nil || p.ident == nil {
			t.Fatalf("shared=%v: pod has no identity", shared)
		}
		same := reflect.ValueOf(p.ident.podLabels).Pointer() == reflect.ValueOf(ls).Pointer()
		if same != shared {
			t.Errorf("shared=%v: the identity keeps the caller's map: %v", shared, same)
		}
		if !shared {
			before := c.Identities()[0].Labels.Key()
			ls["app"] = "written"
			if got := c.Identities()[0].Labels.Key(); got != before {
				t.Errorf("a write to the caller's map reached the identity: %s, was %s", got, before)
			}
		}
	}
}

// A pod keeps nothing its identity holds, and pods of one identity with
// equal named ports share one list; an identity's pods follow joins and
// leaves in any order.
func TestPodsShareTheirIdentitysState(t *testing.T) {
	c, err := New(Options{Node: "self"})
	if err != nil {
		t.Fatal(err)
	}
	ports := []PodPort{{Name: "http", Protocol: corev1.ProtocolTCP, Port: 8080}, {Name: "metrics", Port: 9090}}
	names := []string{"a", "b", "c", "d", "e"}
	for i, n := range names {
		c.UpsertPodFacts(PodFacts{Namespace: "x", Name: n, Labels: map[string]string{"app": "a"}, ServiceAccount: "sa", NodeName: "n1",
			IPs: []string{"10.0.0." + string(rune('1'+i))}, Ports: ports})
	}
	a, b := c.pods.get(EndpointID{"x", "a"}), c.pods.get(EndpointID{"x", "b"})
	if a.ident != b.ident || a.ports != b.ports {
		t.Errorf("pods of one identity with equal ports: identities %p %p, ports %p %p", a.ident, b.ident, a.ports, b.ports)
	}
	if a.serviceAccount() != "sa" || a.labels()["app"] != "a" {
		t.Errorf("pod reads service account %q, labels %v", a.serviceAccount(), a.labels())
	}
	// Leave from the middle, the front and the back; every index stays
	// right.
	for _, n := range []string{"c", "a", "e"} {
		c.DeletePod("x", n)
		for i, p := range b.ident.pods {
			if p.identIdx != int32(i) || p.ident != b.ident {
				t.Fatalf("after deleting %s: pod %s at %d has index %d", n, p.id, i, p.identIdx)
			}
		}
	}
	if got := len(b.ident.pods); got != 2 {
		t.Errorf("identity has %d pods, want 2", got)
	}
	// A relabel moves the pod to another identity; the last one leaving
	// removes the identity.
	old := b.ident
	c.UpsertPodFacts(PodFacts{Namespace: "x", Name: "b", Labels: map[string]string{"app": "z"}, NodeName: "n1", IPs: []string{"10.0.0.2"}, Ports: ports})
	c.DeletePod("x", "d")
	if _, ok := c.idents[old.id]; ok || len(old.pods) != 0 {
		t.Errorf("identity %d still held with %d pods", old.id, len(old.pods))
	}
	if nb := c.pods.get(EndpointID{"x", "b"}); nb.labels()["app"] != "z" || len(nb.ident.pods) != 1 {
		t.Errorf("relabelled pod: labels %v, identity pods %d", nb.labels(), len(nb.ident.pods))
	}
}

// Changes.PrevIPs tells the addresses a pod had when they change or it
// stops being an endpoint, and nothing when they stay.
func TestChangesTellPreviousAddresses(t *testing.T) {
	c, err := New(Options{Node: "self"})
	if err != nil {
		t.Fatal(err)
	}
	id := EndpointID{"x", "a"}
	at := func(labels map[string]string, ips ...string) Changes {
		return c.UpsertPodFacts(PodFacts{Namespace: "x", Name: "a", Labels: labels, NodeName: "n1", IPs: ips})
	}
	app := map[string]string{"app": "a"}
	if ch := at(app, "10.0.0.1"); ch.PrevIPs != nil {
		t.Errorf("new pod: PrevIPs %v", ch.PrevIPs)
	}
	if ch := at(map[string]string{"app": "b"}, "10.0.0.1"); ch.PrevIPs != nil || len(ch.Endpoints) != 1 {
		t.Errorf("relabel: PrevIPs %v, endpoints %v", ch.PrevIPs, ch.Endpoints)
	}
	if ch := at(app, "10.0.0.2", "fd00::2"); fmt.Sprint(ch.PrevIPs[id]) != "[10.0.0.1]" {
		t.Errorf("moved: PrevIPs %v", ch.PrevIPs)
	}
	if ch := at(app); fmt.Sprint(ch.PrevIPs[id]) != "[10.0.0.2 fd00::2]" || len(ch.Removed) != 1 {
		t.Errorf("lost its addresses: PrevIPs %v, removed %v", ch.PrevIPs, ch.Removed)
	}
	if ch := at(app, "10.0.0.3"); ch.PrevIPs != nil {
		t.Errorf("active again: PrevIPs %v", ch.PrevIPs)
	}
	if ch := c.DeletePod("x", "a"); fmt.Sprint(ch.PrevIPs[id]) != "[10.0.0.3]" {
		t.Errorf("deleted: PrevIPs %v", ch.PrevIPs)
	}
}

// TestPodStateIsSmall: one podState is kept for every pod of the cluster,
// in the allocator's 96-byte size class; a field that pushes it past
// costs 16 bytes more for each pod (2.3 MiB at 150,000 pods).
func TestPodStateIsSmall(t *testing.T) {
	if got := unsafe.Sizeof(podState{}); got > 96 {
		t.Errorf("podState is %d bytes, more than 96", got)
	}
}
