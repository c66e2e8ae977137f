package services

import (
	"context"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/veilmesh/veil/agent/datapath"
)

// fakeTranslations is the socket programs' record: (netns, backend) ->
// translation.
type fakeTranslations map[uint64]map[netip.AddrPort]datapath.ServiceTranslation

func (f fakeTranslations) LastTranslation(netns uint64, backend netip.AddrPort, _ uint8) (datapath.ServiceTranslation, bool, error) {
	tr, ok := f[netns][backend]
	return tr, ok, nil
}

func (f fakeTranslations) ServiceStats() (datapath.ServiceStats, error) {
	return datapath.ServiceStats{Translated: 7, Refused: 2}, nil
}

// runController runs a controller over services, against fm, until the
// test ends, and waits until want entries are written.
func runController(t *testing.T, fm *fakeMap, want int, svcs ...*corev1.Service) *Controller {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	kube := fake.NewClientset()
	for _, s := range svcs {
		if _, err := kube.CoreV1().Services(s.Namespace).Create(ctx, s, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	c, _ := startController(t, ctx, kube, fm, Config{NodeName: "n1"})
	for {
		c.mu.Lock()
		n := len(c.names)
		c.mu.Unlock()
		if n >= want {
			return c
		}
		select {
		case <-ctx.Done():
			t.Fatalf("%d entries written; want %d", n, want)
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// TestFlowNamer: a flow between a local pod and a backend that pod's
// network namespace was just sent to names the Service; an old
// translation, another pod, or an address of no Service names none; the
// namespace cookie is read once per namespace.
func TestFlowNamer(t *testing.T) {
	web := service("web", "10.96.0.10", port("http", corev1.ProtocolTCP, 80, intstr.FromInt32(8080)))
	c := runController(t, &fakeMap{m: map[datapath.ServiceKey][]datapath.Backend{}}, 1, web)
	client, other := netip.MustParseAddr("10.244.1.3"), netip.MustParseAddr("10.244.1.4")
	backend, stale := netip.MustParseAddrPort("10.244.2.2:8080"), netip.MustParseAddrPort("10.244.2.3:8080")
	unknown := netip.MustParseAddrPort("10.244.2.4:8080")
	reads := 0
	n := &FlowNamer{
		Translations: fakeTranslations{7: {
			backend: {Service: netip.MustParseAddrPort("10.96.0.10:80"), Age: time.Second},
			stale:   {Service: netip.MustParseAddrPort("10.96.0.10:80"), Age: FlowWindow + time.Second},
			unknown: {Service: netip.MustParseAddrPort("10.96.9.9:80"), Age: time.Second},
		}},
		Services: c,
		Netns: func(ip netip.Addr) (string, bool) {
			switch ip {
			case client:
				return "/run/netns/client", true
			case other:
				return "/run/netns/other", true
			}
			return "", false
		},
		Cookie: func(path string) (uint64, error) {
			reads++
			if path == "/run/netns/client" {
				return 7, nil
			}
			return 8, nil
		},
	}
	for _, tc := range []struct {
		name    string
		client  netip.Addr
		backend netip.AddrPort
		want    string
	}{
		{"translated just now", client, backend, "demo/web:80"},
		{"again (cookie cached)", client, backend, "demo/web:80"},
		{"translated too long ago", client, stale, ""},
		{"to an address of no Service", client, unknown, ""},
		{"another pod", other, backend, ""},
		{"not a local pod", backend.Addr(), netip.AddrPortFrom(client, 40000), ""},
	} {
		if got := n.ServiceVia(tc.client, tc.backend, 6); got != tc.want {
			t.Errorf("%s: %q; want %q", tc.name, got, tc.want)
		}
	}
	if reads != 2 {
		t.Errorf("namespace cookies read %d times; want 2 (once per namespace)", reads)
	}
}

// TestMetrics: translations and refusals from the datapath, Service
// addresses without backends, unresolved ports, and a full map counted
// (and the Services that fit still written).
func TestMetrics(t *testing.T) {
	web := service("web", "10.96.0.10", port("http", corev1.ProtocolTCP, 80, intstr.FromInt32(8080)))
	empty := service("empty", "10.96.0.11", port("http", corev1.ProtocolTCP, 80, intstr.FromInt32(8080)))
	third := service("third", "10.96.0.12", port("http", corev1.ProtocolTCP, 80, intstr.FromInt32(8080)))
	fm := &fakeMap{m: map[datapath.ServiceKey][]datapath.Backend{}, capacity: 2}
	c := runController(t, fm, 2, web, empty, third)
	m := NewCollector(c, fakeTranslations{})
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(m)
	deadline := time.Now().Add(10 * time.Second)
	for {
		full, _ := c.writeErrors()
		if full > 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	want := `
# HELP veil_service_translations_total Connects and sends to a Service address: translated to a backend, or refused for want of one.
# TYPE veil_service_translations_total counter
veil_service_translations_total{result="refused"} 2
veil_service_translations_total{result="translated"} 7
# HELP veil_services_without_backends Service addresses (cluster IP, port, protocol) without backends, whose clients are refused.
# TYPE veil_services_without_backends gauge
veil_services_without_backends 2
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "veil_service_translations_total", "veil_services_without_backends"); err != nil {
		t.Error(err)
	}
	full, other := c.writeErrors()
	if full == 0 || other != 0 {
		t.Errorf("write errors: full %d, other %d; want full > 0, other 0", full, other)
	}
	if n, err := testutil.GatherAndCount(reg, "veil_service_map_write_errors_total", "veil_service_ports_unresolved"); err != nil || n != 3 {
		t.Errorf("%d series of write errors and unresolved ports, %v; want 3", n, err)
	}
	if len(fm.m) != 2 {
		t.Errorf("%d services in the map; want the 2 that fit", len(fm.m))
	}
}
