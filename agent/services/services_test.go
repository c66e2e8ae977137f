package services

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	kubeinformers "k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/veilmesh/veil/agent/datapath"
)

// fakeMap is a datapath service map in memory.
type fakeMap struct {
	mu       sync.Mutex
	m        map[datapath.ServiceKey][]datapath.Backend
	affinity map[datapath.ServiceKey]time.Duration
	// capacity, when not 0, is how many entries fit; more fail as a full
	// datapath map does.
	capacity int
}

func (f *fakeMap) UpsertService(s datapath.Service) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.m[s.ServiceKey]; !ok && f.capacity > 0 && len(f.m) >= f.capacity {
		return fmt.Errorf("write service %s: %w", s.ServiceKey, datapath.ErrServiceMapFull)
	}
	f.m[s.ServiceKey] = s.Backends
	if f.affinity == nil {
		f.affinity = map[datapath.ServiceKey]time.Duration{}
	}
	f.affinity[s.ServiceKey] = s.Affinity
	return nil
}

func (f *fakeMap) affinityOf(k datapath.ServiceKey) time.Duration {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.affinity[k]
}

func (f *fakeMap) DeleteService(k datapath.ServiceKey) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.m, k)
	return nil
}

func (f *fakeMap) Services() ([]datapath.Service, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []datapath.Service
	for k, bs := range f.m {
		out = append(out, datapath.Service{ServiceKey: k, Backends: bs})
	}
	return out, nil
}

func (f *fakeMap) String() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return fmt.Sprint(f.m)
}

var _ Writer = (*fakeMap)(nil)

func ptr[T any](v T) *T { return &v }

func key(vip string, port uint16, proto uint8) datapath.ServiceKey {
	return datapath.ServiceKey{VIP: netip.MustParseAddr(vip), Port: port, Proto: proto}
}

func be(ip string, port uint16) datapath.Backend {
	return datapath.Backend{IP: netip.MustParseAddr(ip), Port: port}
}

func term(ip string, port uint16) datapath.Backend {
	b := be(ip, port)
	b.Terminating = true
	return b
}

func service(name, ip string, ports ...corev1.ServicePort) *corev1.Service {
	return &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "demo", Name: name},
		Spec:       corev1.ServiceSpec{ClusterIP: ip, ClusterIPs: []string{ip}, Ports: ports},
	}
}

func port(name string, proto corev1.Protocol, p int32, target intstr.IntOrString) corev1.ServicePort {
	return corev1.ServicePort{Name: name, Protocol: proto, Port: p, TargetPort: target}
}

type ep struct {
	ip, node                    string
	ready, serving, terminating bool
}

func readyEP(ip, node string) ep { return ep{ip: ip, node: node, ready: true, serving: true} }

func slice(svc, name string, ports []discoveryv1.EndpointPort, eps ...ep) *discoveryv1.EndpointSlice {
	s := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Namespace: "demo", Name: name,
			Labels: map[string]string{discoveryv1.LabelServiceName: svc}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       ports,
	}
	for _, e := range eps {
		s.Endpoints = append(s.Endpoints, discoveryv1.Endpoint{
			Addresses: []string{e.ip},
			NodeName:  ptr(e.node),
			Conditions: discoveryv1.EndpointConditions{
				Ready: ptr(e.ready), Serving: ptr(e.serving), Terminating: ptr(e.terminating),
			},
		})
	}
	return s
}

func sport(name string, proto corev1.Protocol, p int32) discoveryv1.EndpointPort {
	return discoveryv1.EndpointPort{Name: ptr(name), Protocol: ptr(proto), Port: ptr(p)}
}

// mapWant is what a test expects the service map to hold.
type mapWant = map[datapath.ServiceKey][]datapath.Backend

// startController runs a Controller of kube's Services into fm until the
// test ends, and returns it with await, which waits (until ctx ends) for
// fm to hold want.
func startController(t *testing.T, ctx context.Context, kube *fake.Clientset, fm *fakeMap, cfg Config) (*Controller, func(what string, want mapWant)) {
	t.Helper()
	runCtx, cancel := context.WithCancel(ctx)
	factory := kubeinformers.NewSharedInformerFactory(kube, 0)
	c, err := New(factory, fm, cfg)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	factory.Start(runCtx.Done())
	done := make(chan error, 1)
	go func() { done <- c.Run(runCtx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
		factory.Shutdown()
	})
	await := func(what string, want mapWant) {
		t.Helper()
		for fm.String() != fmt.Sprint(want) {
			select {
			case <-ctx.Done():
				t.Fatalf("%s: map %v; want %v", what, fm, want)
			case <-time.After(5 * time.Millisecond):
			}
		}
	}
	return c, await
}

func TestEntries(t *testing.T) {
	web := service("web", "10.96.0.10",
		port("http", corev1.ProtocolTCP, 80, intstr.FromString("http")),
		port("dns", corev1.ProtocolUDP, 53, intstr.FromInt32(5353)))
	for _, c := range []struct {
		name string
		svc  *corev1.Service
		eps  []*discoveryv1.EndpointSlice
		want string
	}{
		{
			name: "named target port resolved per endpoint, two protocols",
			svc:  web,
			eps: []*discoveryv1.EndpointSlice{
				// Pods that name port "http" differently land in different slices.
				slice("web", "web-a", []discoveryv1.EndpointPort{sport("http", corev1.ProtocolTCP, 8080), sport("dns", corev1.ProtocolUDP, 5353)},
					readyEP("10.244.1.3", "n1")),
				slice("web", "web-b", []discoveryv1.EndpointPort{sport("http", corev1.ProtocolTCP, 9090), sport("dns", corev1.ProtocolUDP, 5353)},
					readyEP("10.244.2.2", "n2")),
			},
			want: fmt.Sprint(map[datapath.ServiceKey][]datapath.Backend{
				key("10.96.0.10", 80, 6):  {be("10.244.1.3", 8080), be("10.244.2.2", 9090)},
				key("10.96.0.10", 53, 17): {be("10.244.1.3", 5353), be("10.244.2.2", 5353)},
			}),
		},
		{
			name: "not ready and not terminating is left out; terminating kept as such",
			svc:  service("web", "10.96.0.10", port("", corev1.ProtocolTCP, 80, intstr.FromInt32(80))),
			eps: []*discoveryv1.EndpointSlice{slice("web", "w", []discoveryv1.EndpointPort{{Port: ptr(int32(80))}},
				ep{ip: "10.244.1.3"}, ep{ip: "10.244.1.4", serving: true, terminating: true}, ep{ip: "10.244.1.5", terminating: true}, readyEP("10.244.1.6", "n1"))},
			want: fmt.Sprint(map[datapath.ServiceKey][]datapath.Backend{
				key("10.96.0.10", 80, 6): {term("10.244.1.4", 80), be("10.244.1.6", 80)},
			}),
		},
		{
			name: "no endpoints: an entry without backends (refuse)",
			svc:  service("web", "10.96.0.10", port("", corev1.ProtocolTCP, 80, intstr.FromInt32(80))),
			want: fmt.Sprint(map[datapath.ServiceKey][]datapath.Backend{key("10.96.0.10", 80, 6): nil}),
		},
		{
			name: "a port name no slice declares: no backends",
			svc:  service("web", "10.96.0.10", port("metrics", corev1.ProtocolTCP, 9100, intstr.FromString("metrics"))),
			eps:  []*discoveryv1.EndpointSlice{slice("web", "w", []discoveryv1.EndpointPort{sport("http", corev1.ProtocolTCP, 8080)}, readyEP("10.244.1.3", "n1"))},
			want: fmt.Sprint(map[datapath.ServiceKey][]datapath.Backend{key("10.96.0.10", 9100, 6): nil}),
		},
		{
			name: "internalTrafficPolicy Local keeps this node's endpoints",
			svc: func() *corev1.Service {
				s := service("web", "10.96.0.10", port("", corev1.ProtocolTCP, 80, intstr.FromInt32(80)))
				s.Spec.InternalTrafficPolicy = ptr(corev1.ServiceInternalTrafficPolicyLocal)
				return s
			}(),
			eps: []*discoveryv1.EndpointSlice{slice("web", "w", []discoveryv1.EndpointPort{{Port: ptr(int32(80))}},
				readyEP("10.244.1.3", "n1"), readyEP("10.244.2.2", "n2"))},
			want: fmt.Sprint(map[datapath.ServiceKey][]datapath.Backend{key("10.96.0.10", 80, 6): {be("10.244.1.3", 80)}}),
		},
		{
			name: "headless: nothing",
			svc:  service("web", "None", port("", corev1.ProtocolTCP, 80, intstr.FromInt32(80))),
			want: fmt.Sprint(map[datapath.ServiceKey][]datapath.Backend{}),
		},
	} {
		t.Run(c.name, func(t *testing.T) {
			if got := fmt.Sprint(Entries(c.svc, c.eps, "n1")); got != c.want {
				t.Errorf("got %v; want %v", got, c.want)
			}
		})
	}
}

func TestAffinity(t *testing.T) {
	for _, c := range []struct {
		name string
		spec corev1.ServiceSpec
		want time.Duration
	}{
		{"none", corev1.ServiceSpec{SessionAffinity: corev1.ServiceAffinityNone}, 0},
		{"unset", corev1.ServiceSpec{}, 0},
		{"ClientIP, default timeout", corev1.ServiceSpec{SessionAffinity: corev1.ServiceAffinityClientIP}, DefaultAffinity},
		{"ClientIP 30s", corev1.ServiceSpec{SessionAffinity: corev1.ServiceAffinityClientIP,
			SessionAffinityConfig: &corev1.SessionAffinityConfig{ClientIP: &corev1.ClientIPConfig{TimeoutSeconds: ptr(int32(30))}}}, 30 * time.Second},
		{"ClientIP 0s (refused by the API) is 1s", corev1.ServiceSpec{SessionAffinity: corev1.ServiceAffinityClientIP,
			SessionAffinityConfig: &corev1.SessionAffinityConfig{ClientIP: &corev1.ClientIPConfig{TimeoutSeconds: ptr(int32(0))}}}, time.Second},
		{"ClientIP over a day is a day", corev1.ServiceSpec{SessionAffinity: corev1.ServiceAffinityClientIP,
			SessionAffinityConfig: &corev1.SessionAffinityConfig{ClientIP: &corev1.ClientIPConfig{TimeoutSeconds: ptr(int32(100000))}}}, datapath.MaxAffinity},
	} {
		if got := Affinity(&corev1.Service{Spec: c.spec}); got != c.want {
			t.Errorf("%s: got %s; want %s", c.name, got, c.want)
		}
	}
}

// TestController follows a Service through the fake API server: slices
// appear, backends terminate, the Service is deleted; an entry left in the
// map by an earlier agent for a Service that is gone is removed at start.
func TestController(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	kube := fake.NewClientset()
	stale := key("10.96.9.9", 80, 6)
	fm := &fakeMap{m: map[datapath.ServiceKey][]datapath.Backend{stale: {be("10.244.9.9", 80)}}}
	_, await := startController(t, ctx, kube, fm, Config{NodeName: "n1"})
	svcs := kube.CoreV1().Services("demo")
	eps := kube.DiscoveryV1().EndpointSlices("demo")
	http := key("10.96.0.10", 80, 6)

	if _, err := svcs.Create(ctx, service("web", "10.96.0.10", port("http", corev1.ProtocolTCP, 80, intstr.FromString("http"))), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	await("service without slices", map[datapath.ServiceKey][]datapath.Backend{http: nil})

	ports := []discoveryv1.EndpointPort{sport("http", corev1.ProtocolTCP, 8080)}
	s := slice("web", "web-1", ports, readyEP("10.244.1.3", "n1"), readyEP("10.244.2.2", "n2"))
	if _, err := eps.Create(ctx, s, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	await("two ready", map[datapath.ServiceKey][]datapath.Backend{http: {be("10.244.1.3", 8080), be("10.244.2.2", 8080)}})

	s = slice("web", "web-1", ports, ep{ip: "10.244.1.3", serving: true, terminating: true}, readyEP("10.244.2.2", "n2"))
	if _, err := eps.Update(ctx, s, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	await("one terminating", map[datapath.ServiceKey][]datapath.Backend{http: {term("10.244.1.3", 8080), be("10.244.2.2", 8080)}})

	// A second Service whose slice is unrelated to the first.
	if _, err := svcs.Create(ctx, service("dns", "10.96.0.53", port("dns", corev1.ProtocolUDP, 53, intstr.FromInt32(53))), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	dns := key("10.96.0.53", 53, 17)
	await("second service", map[datapath.ServiceKey][]datapath.Backend{http: {term("10.244.1.3", 8080), be("10.244.2.2", 8080)}, dns: nil})

	if err := eps.Delete(ctx, "web-1", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	await("slice deleted", map[datapath.ServiceKey][]datapath.Backend{http: nil, dns: nil})

	// Session affinity: the default timeout, then a changed timeout alone
	// (same backends) is written too.
	awaitAffinity := func(what string, want time.Duration) {
		t.Helper()
		for fm.affinityOf(http) != want {
			select {
			case <-ctx.Done():
				t.Fatalf("%s: affinity %s; want %s", what, fm.affinityOf(http), want)
			case <-time.After(5 * time.Millisecond):
			}
		}
	}
	web, err := svcs.Get(ctx, "web", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	web.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
	if web, err = svcs.Update(ctx, web, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	awaitAffinity("ClientIP", DefaultAffinity)
	web.Spec.SessionAffinityConfig = &corev1.SessionAffinityConfig{ClientIP: &corev1.ClientIPConfig{TimeoutSeconds: ptr(int32(60))}}
	if _, err = svcs.Update(ctx, web, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	awaitAffinity("ClientIP 60s", time.Minute)

	if err := svcs.Delete(ctx, "web", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	await("service deleted", map[datapath.ServiceKey][]datapath.Backend{dns: nil})
}

// TestView: the Services as the node sees them, with each backend's node
// and pod, and a port whose target port name no endpoint declares shown
// (and counted) with why it has no backends while the other port works.
func TestView(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	kube := fake.NewClientset()
	factory := kubeinformers.NewSharedInformerFactory(kube, 0)
	fm := &fakeMap{m: map[datapath.ServiceKey][]datapath.Backend{}}
	c, err := New(factory, fm, Config{NodeName: "n1"})
	if err != nil {
		t.Fatal(err)
	}
	web := service("web", "10.96.0.10",
		port("http", corev1.ProtocolTCP, 80, intstr.FromString("http")),
		port("metrics", corev1.ProtocolTCP, 9100, intstr.FromString("metrics")))
	web.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
	s := slice("web", "web-1", []discoveryv1.EndpointPort{sport("http", corev1.ProtocolTCP, 8080)},
		readyEP("10.244.2.2", "n2"), ep{ip: "10.244.1.3", node: "n1", serving: true, terminating: true})
	s.Endpoints[0].TargetRef = &corev1.ObjectReference{Kind: "Pod", Namespace: "demo", Name: "web-b"}
	headless := service("db", "None", port("", corev1.ProtocolTCP, 5432, intstr.FromInt32(5432)))
	for _, obj := range []struct {
		create func() error
	}{
		{func() error {
			_, err := kube.CoreV1().Services("demo").Create(ctx, web, metav1.CreateOptions{})
			return err
		}},
		{func() error {
			_, err := kube.CoreV1().Services("demo").Create(ctx, headless, metav1.CreateOptions{})
			return err
		}},
		{func() error {
			_, err := kube.DiscoveryV1().EndpointSlices("demo").Create(ctx, s, metav1.CreateOptions{})
			return err
		}},
	} {
		if err := obj.create(); err != nil {
			t.Fatal(err)
		}
	}
	factory.Start(ctx.Done())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()

	var got []ServiceView
	for c.Problems() != 1 || len(got) != 1 || len(got[0].Ports) != 2 || len(got[0].Ports[0].Backends) != 2 {
		select {
		case <-ctx.Done():
			t.Fatalf("view %+v, %d problems; want web with two ports, one problem", got, c.Problems())
		case <-time.After(5 * time.Millisecond):
		}
		if got, err = c.View(""); err != nil {
			t.Fatal(err)
		}
	}
	v := got[0]
	if v.Namespace != "demo" || v.Name != "web" || v.Type != "ClusterIP" || fmt.Sprint(v.ClusterIPs) != "[10.96.0.10]" || v.Affinity != DefaultAffinity {
		t.Errorf("service: got %+v", v)
	}
	http, metrics := v.Ports[0], v.Ports[1]
	wantHTTP := fmt.Sprint([]BackendView{
		{IP: netip.MustParseAddr("10.244.1.3"), Port: 8080, Node: "n1", Terminating: true},
		{IP: netip.MustParseAddr("10.244.2.2"), Port: 8080, Node: "n2", Pod: "demo/web-b"},
	})
	if http.Name != "http" || http.Port != 80 || http.Protocol != "TCP" || http.TargetPort != "http" || fmt.Sprint(http.Backends) != wantHTTP || http.Problem != "" {
		t.Errorf("http port: got %+v; want backends %s", http, wantHTTP)
	}
	if r, term := http.Counts(); r != 1 || term != 1 {
		t.Errorf("http counts: %d ready, %d terminating; want 1, 1", r, term)
	}
	if len(metrics.Backends) != 0 || !strings.Contains(metrics.Problem, `no endpoint declares target port "metrics"`) {
		t.Errorf("metrics port: got %+v; want no backends and the undeclared port name", metrics)
	}
	if other, err := c.View("other"); err != nil || len(other) != 0 {
		t.Errorf("view of another namespace: %v %v", other, err)
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Run: %v", err)
	}
}

// TestAPIServerServiceKeepsItsLastBackends: an API server that shuts down
// takes itself out of default/kubernetes. The agent's own connections to the
// API server go through this map, so emptying it would leave the agent
// refused at the Service's address and it would never see the API server
// come back. The last backends stay until others replace them or the
// Service goes; any other Service that loses its backends has none.
func TestAPIServerServiceKeepsItsLastBackends(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	kube := fake.NewClientset()
	fm := &fakeMap{m: map[datapath.ServiceKey][]datapath.Backend{}}
	_, await := startController(t, ctx, kube, fm, Config{NodeName: "n1"})

	api := service("kubernetes", "10.96.0.1", port("https", corev1.ProtocolTCP, 443, intstr.FromInt32(6443)))
	api.Namespace = metav1.NamespaceDefault
	if _, err := kube.CoreV1().Services(metav1.NamespaceDefault).Create(ctx, api, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	apiSlice := func(ips ...string) *discoveryv1.EndpointSlice {
		var eps []ep
		for _, ip := range ips {
			eps = append(eps, readyEP(ip, ""))
		}
		s := slice("kubernetes", "kubernetes", []discoveryv1.EndpointPort{sport("https", corev1.ProtocolTCP, 6443)}, eps...)
		s.Namespace = metav1.NamespaceDefault
		return s
	}
	slices := kube.DiscoveryV1().EndpointSlices(metav1.NamespaceDefault)
	if _, err := slices.Create(ctx, apiSlice("192.168.77.1"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	vip := key("10.96.0.1", 443, 6)
	await("API server up", map[datapath.ServiceKey][]datapath.Backend{vip: {be("192.168.77.1", 6443)}})

	// A second Service that loses its backends, to show the rule is the
	// API server's alone.
	if _, err := kube.CoreV1().Services("demo").Create(ctx, service("web", "10.96.0.10", port("http", corev1.ProtocolTCP, 80, intstr.FromInt32(8080))), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	web := slice("web", "web-1", []discoveryv1.EndpointPort{sport("http", corev1.ProtocolTCP, 8080)}, readyEP("10.244.1.3", "n1"))
	if _, err := kube.DiscoveryV1().EndpointSlices("demo").Create(ctx, web, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	http := key("10.96.0.10", 80, 6)
	await("web up", map[datapath.ServiceKey][]datapath.Backend{vip: {be("192.168.77.1", 6443)}, http: {be("10.244.1.3", 8080)}})

	// The API server stops: its slice empties (as it leaves it), and so
	// does web's.
	if _, err := slices.Update(ctx, apiSlice(), metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	web.Endpoints = nil
	if _, err := kube.DiscoveryV1().EndpointSlices("demo").Update(ctx, web, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	await("API server away, web without backends", map[datapath.ServiceKey][]datapath.Backend{vip: {be("192.168.77.1", 6443)}, http: nil})
	// Both updates are seen (web's emptied), and the API server's entry
	// still holds its last backend.

	// It comes back at another address: that replaces the kept one.
	if _, err := slices.Update(ctx, apiSlice("192.168.77.2"), metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	await("API server back", map[datapath.ServiceKey][]datapath.Backend{vip: {be("192.168.77.2", 6443)}, http: nil})

	// The Service itself deleted: its entry goes.
	if err := kube.CoreV1().Services(metav1.NamespaceDefault).Delete(ctx, "kubernetes", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	await("API server Service deleted", map[datapath.ServiceKey][]datapath.Backend{http: nil})
}
