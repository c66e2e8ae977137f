package services

import (
	"context"
	"fmt"
	"net/netip"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/veilmesh/veil/agent/datapath"
)

func nodePortKey(port uint16, proto uint8) datapath.ServiceKey {
	return datapath.ServiceKey{VIP: datapath.NodePortVIP, Port: port, Proto: proto, External: true}
}

func externalKey(vip string, port uint16, proto uint8) datapath.ServiceKey {
	return datapath.ServiceKey{VIP: netip.MustParseAddr(vip), Port: port, Proto: proto, External: true}
}

func nodePortService(typ corev1.ServiceType, etp corev1.ServiceExternalTrafficPolicy) *corev1.Service {
	s := service("web", "10.96.0.10",
		corev1.ServicePort{Name: "http", Protocol: corev1.ProtocolTCP, Port: 80, TargetPort: intstr.FromInt32(8080), NodePort: 30080},
		corev1.ServicePort{Name: "dns", Protocol: corev1.ProtocolUDP, Port: 53, TargetPort: intstr.FromInt32(5353), NodePort: 30053})
	s.Spec.Type = typ
	s.Spec.ExternalTrafficPolicy = etp
	return s
}

func TestExternalEntries(t *testing.T) {
	eps := []*discoveryv1.EndpointSlice{slice("web", "w",
		[]discoveryv1.EndpointPort{sport("http", corev1.ProtocolTCP, 8080), sport("dns", corev1.ProtocolUDP, 5353)},
		readyEP("10.244.1.3", "n1"), readyEP("10.244.2.2", "n2"))}
	both := func(p uint16) []datapath.Backend { return []datapath.Backend{be("10.244.1.3", p), be("10.244.2.2", p)} }
	lb := nodePortService(corev1.ServiceTypeLoadBalancer, corev1.ServiceExternalTrafficPolicyCluster)
	lb.Status.LoadBalancer.Ingress = []corev1.LoadBalancerIngress{{IP: "192.0.2.100"}, {Hostname: "lb.example"}, {IP: "2001:db8::1"}}
	lb.Spec.ExternalIPs = []string{"198.51.100.7"}
	for _, c := range []struct {
		name string
		svc  *corev1.Service
		node string
		want map[datapath.ServiceKey][]datapath.Backend
	}{
		{"ClusterIP: none", service("web", "10.96.0.10", port("http", corev1.ProtocolTCP, 80, intstr.FromInt32(8080))), "n1",
			map[datapath.ServiceKey][]datapath.Backend{}},
		{"NodePort, Cluster policy: every backend", nodePortService(corev1.ServiceTypeNodePort, corev1.ServiceExternalTrafficPolicyCluster), "n1",
			map[datapath.ServiceKey][]datapath.Backend{nodePortKey(30080, 6): both(8080), nodePortKey(30053, 17): both(5353)}},
		{"NodePort, Local policy: this node's backends", nodePortService(corev1.ServiceTypeNodePort, corev1.ServiceExternalTrafficPolicyLocal), "n2",
			map[datapath.ServiceKey][]datapath.Backend{
				nodePortKey(30080, 6): {be("10.244.2.2", 8080)}, nodePortKey(30053, 17): {be("10.244.2.2", 5353)}}},
		{"NodePort, Local policy, node without a backend: frontends without backends", nodePortService(corev1.ServiceTypeNodePort, corev1.ServiceExternalTrafficPolicyLocal), "n3",
			map[datapath.ServiceKey][]datapath.Backend{nodePortKey(30080, 6): nil, nodePortKey(30053, 17): nil}},
		{"LoadBalancer: node ports, IPv4 ingress IPs and external IPs at the Service port", lb, "n1",
			map[datapath.ServiceKey][]datapath.Backend{
				nodePortKey(30080, 6): both(8080), nodePortKey(30053, 17): both(5353),
				externalKey("192.0.2.100", 80, 6): both(8080), externalKey("192.0.2.100", 53, 17): both(5353),
				externalKey("198.51.100.7", 80, 6): both(8080), externalKey("198.51.100.7", 53, 17): both(5353),
			}},
	} {
		t.Run(c.name, func(t *testing.T) {
			if got := fmt.Sprint(ExternalEntries(c.svc, eps, c.node)); got != fmt.Sprint(c.want) {
				t.Errorf("got %v\nwant %v", got, c.want)
			}
		})
	}
}

// The controller writes external frontends only with kube-proxy
// replacement on (Config.NodePort), and removes them with their Service.
func TestControllerNodePorts(t *testing.T) {
	for _, on := range []bool{false, true} {
		t.Run(fmt.Sprintf("NodePort=%v", on), func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			kube := fake.NewClientset()
			fm := &fakeMap{m: map[datapath.ServiceKey][]datapath.Backend{}}
			_, await := startController(t, ctx, kube, fm, Config{NodeName: "n1", NodePort: on})
			if _, err := kube.CoreV1().Services("demo").Create(ctx, nodePortService(corev1.ServiceTypeNodePort, corev1.ServiceExternalTrafficPolicyLocal), metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
			s := slice("web", "w", []discoveryv1.EndpointPort{sport("http", corev1.ProtocolTCP, 8080), sport("dns", corev1.ProtocolUDP, 5353)},
				readyEP("10.244.1.3", "n1"), readyEP("10.244.2.2", "n2"))
			if _, err := kube.DiscoveryV1().EndpointSlices("demo").Create(ctx, s, metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
			want := map[datapath.ServiceKey][]datapath.Backend{
				key("10.96.0.10", 80, 6):  {be("10.244.1.3", 8080), be("10.244.2.2", 8080)},
				key("10.96.0.10", 53, 17): {be("10.244.1.3", 5353), be("10.244.2.2", 5353)},
			}
			if on {
				want[nodePortKey(30080, 6)] = []datapath.Backend{be("10.244.1.3", 8080)}
				want[nodePortKey(30053, 17)] = []datapath.Backend{be("10.244.1.3", 5353)}
			}
			await("written", want)
			if err := kube.CoreV1().Services("demo").Delete(ctx, "web", metav1.DeleteOptions{}); err != nil {
				t.Fatal(err)
			}
			await("deleted", map[datapath.ServiceKey][]datapath.Backend{})
		})
	}
}

// A node without a local backend for an externalTrafficPolicy Local
// Service writes its frontends without backends by design: that is not a
// Service without backends (veil_services_without_backends).
func TestWithoutBackendsLeavesOutExternalFrontends(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	kube := fake.NewClientset(nodePortService(corev1.ServiceTypeNodePort, corev1.ServiceExternalTrafficPolicyLocal),
		slice("web", "w", []discoveryv1.EndpointPort{sport("http", corev1.ProtocolTCP, 8080), sport("dns", corev1.ProtocolUDP, 5353)},
			readyEP("10.244.1.3", "n1")))
	fm := &fakeMap{m: map[datapath.ServiceKey][]datapath.Backend{}}
	c, await := startController(t, ctx, kube, fm, Config{NodeName: "n3", NodePort: true})
	await("written", map[datapath.ServiceKey][]datapath.Backend{
		key("10.96.0.10", 80, 6): {be("10.244.1.3", 8080)}, key("10.96.0.10", 53, 17): {be("10.244.1.3", 5353)},
		nodePortKey(30080, 6): nil, nodePortKey(30053, 17): nil,
	})
	if n := c.WithoutBackends(); n != 0 {
		t.Errorf("WithoutBackends() = %d; want 0 (only external frontends lack backends)", n)
	}
}
