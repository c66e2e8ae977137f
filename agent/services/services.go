// Package services keeps a node's Service map: it watches Services and
// EndpointSlices (discovery.k8s.io/v1) and writes, for every ClusterIP
// address, port and protocol, the backends that sockets on this node are
// load-balanced to.
//
// A change to a Service or to one of its EndpointSlices queues that Service;
// a worker recomputes only its entries and writes only what changed, so an
// EndpointSlice update costs the node one Service's worth of map writes.
//
//	c := services.New(factory, dp, services.Config{NodeName: node})
//	factory.Start(ctx.Done())
//	go c.Run(ctx)
package services

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	kubeinformers "k8s.io/client-go/informers"
	corelisters "k8s.io/client-go/listers/core/v1"
	discoverylisters "k8s.io/client-go/listers/discovery/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"

	"github.com/veilmesh/veil/agent/datapath"
)

// Writer is the part of the datapath the controller writes to.
type Writer interface {
	UpsertService(datapath.Service) error
	DeleteService(datapath.ServiceKey) error
	Services() ([]datapath.Service, error)
}

var _ Writer = (*datapath.Datapath)(nil)

// Config configures a Controller.
type Config struct {
	// NodeName is this node's name: Services with internalTrafficPolicy
	// Local use only endpoints on it.
	NodeName string
	// NodePort also writes every Service's external frontends (NodePorts,
	// LoadBalancer ingress IPs, external IPs; ExternalEntries) for the
	// datapath's kube-proxy replacement.
	NodePort bool
	// Workers is the number of Services synced in parallel. Default 2.
	Workers int
	// Logger receives structured logs. Default slog.Default().
	Logger *slog.Logger
}

// Controller keeps the node's Service map in line with the API server.
type Controller struct {
	cfg      Config
	log      *slog.Logger
	w        Writer
	services corelisters.ServiceLister
	slices   discoverylisters.EndpointSliceLister
	synced   []cache.InformerSynced
	queue    workqueue.TypedRateLimitingInterface[string]

	mu sync.Mutex
	// written: per Service (namespace/name), the entries last written.
	written map[string]map[datapath.ServiceKey]datapath.Service
	// problems: per Service, its ports' problems ("80/TCP" -> why).
	problems map[string]map[string]string
	// names: the Service (namespace/name) of every entry written.
	names map[datapath.ServiceKey]string
	// mapFull and mapOther count failed map writes.
	mapFull, mapOther uint64
}

// New registers the controller's informers with factory; start the factory
// afterwards, then Run.
func New(factory kubeinformers.SharedInformerFactory, w Writer, cfg Config) (*Controller, error) {
	if cfg.Workers == 0 {
		cfg.Workers = 2
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	c := &Controller{
		cfg: cfg, log: cfg.Logger, w: w,
		services: factory.Core().V1().Services().Lister(),
		slices:   factory.Discovery().V1().EndpointSlices().Lister(),
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(workqueue.DefaultTypedControllerRateLimiter[string](),
			workqueue.TypedRateLimitingQueueConfig[string]{Name: "services"}),
		written:  map[string]map[datapath.ServiceKey]datapath.Service{},
		problems: map[string]map[string]string{},
		names:    map[datapath.ServiceKey]string{},
	}
	svcInf := factory.Core().V1().Services().Informer()
	sliceInf := factory.Discovery().V1().EndpointSlices().Informer()
	if _, err := svcInf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    c.enqueueService,
		UpdateFunc: func(_, obj any) { c.enqueueService(obj) },
		DeleteFunc: c.enqueueService,
	}); err != nil {
		return nil, fmt.Errorf("watch services: %w", err)
	}
	if _, err := sliceInf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: c.enqueueSlice,
		UpdateFunc: func(old, obj any) {
			// A slice moved to another Service (label change) updates both.
			c.enqueueSlice(old)
			c.enqueueSlice(obj)
		},
		DeleteFunc: c.enqueueSlice,
	}); err != nil {
		return nil, fmt.Errorf("watch endpointslices: %w", err)
	}
	c.synced = []cache.InformerSynced{svcInf.HasSynced, sliceInf.HasSynced}
	return c, nil
}

func (c *Controller) enqueueService(obj any) {
	if key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj); err == nil {
		c.queue.Add(key)
	}
}

func (c *Controller) enqueueSlice(obj any) {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = t.Obj
	}
	s, ok := obj.(*discoveryv1.EndpointSlice)
	if !ok {
		return
	}
	if name := s.Labels[discoveryv1.LabelServiceName]; name != "" {
		c.queue.Add(s.Namespace + "/" + name)
	}
}

// Run syncs Services until ctx is done. It waits for the informers' first
// list, so the first writes reflect the whole cluster, and first removes
// what the pinned map holds for Services deleted while no agent ran.
func (c *Controller) Run(ctx context.Context) error {
	defer c.queue.ShutDown()
	if !cache.WaitForCacheSync(ctx.Done(), c.synced...) {
		return fmt.Errorf("services: wait for informer caches: %w", ctx.Err())
	}
	if err := c.prune(); err != nil {
		// Not fatal: stale entries only answer for addresses no Service has.
		c.log.Warn("remove stale services", "err", err)
	}
	c.log.Info("service map sync started", "workers", c.cfg.Workers)
	var wg sync.WaitGroup
	for range c.cfg.Workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for c.next(ctx) {
			}
		}()
	}
	<-ctx.Done()
	c.queue.ShutDown()
	wg.Wait()
	return nil
}

func (c *Controller) next(ctx context.Context) bool {
	key, quit := c.queue.Get()
	if quit {
		return false
	}
	defer c.queue.Done(key)
	if err := c.sync(ctx, key); err != nil {
		c.log.Warn("sync service", "service", key, "err", err)
		c.queue.AddRateLimited(key)
		return true
	}
	c.queue.Forget(key)
	return true
}

// prune deletes the map's entries that no current Service wants.
func (c *Controller) prune() error {
	svcs, err := c.services.List(labels.Everything())
	if err != nil {
		return fmt.Errorf("list services: %w", err)
	}
	want := map[datapath.ServiceKey]bool{}
	for _, svc := range svcs {
		// Only the keys matter here, so no slices are needed.
		for k := range c.entries(svc, nil) {
			want[k] = true
		}
	}
	have, err := c.w.Services()
	if err != nil {
		return err
	}
	var errs []error
	for _, s := range have {
		if !want[s.ServiceKey] {
			c.log.Info("removing stale service", "service", s.ServiceKey)
			errs = append(errs, c.w.DeleteService(s.ServiceKey))
		}
	}
	return errors.Join(errs...)
}

// sync converges the map entries of one Service (namespace/name).
func (c *Controller) sync(_ context.Context, key string) error {
	ns, name, err := cache.SplitMetaNamespaceKey(key)
	if err != nil {
		return fmt.Errorf("parse key %q: %w", key, err)
	}
	want := map[datapath.ServiceKey][]datapath.Backend{}
	var affinity time.Duration
	svc, err := c.services.Services(ns).Get(name)
	switch {
	case apierrors.IsNotFound(err):
	case err != nil:
		return fmt.Errorf("get service %s: %w", key, err)
	default:
		sel := labels.SelectorFromSet(labels.Set{discoveryv1.LabelServiceName: name})
		eps, err := c.slices.EndpointSlices(ns).List(sel)
		if err != nil {
			return fmt.Errorf("list endpointslices of %s: %w", key, err)
		}
		want = c.entries(svc, eps)
		affinity = Affinity(svc)
	}

	c.mu.Lock()
	defer c.mu.Unlock()
	have := c.written[key]
	if key == apiServerService {
		c.keepAPIServerBackends(have, want)
	}
	c.noteProblems(key, svc, want)
	var errs []error
	for k, bs := range want {
		if old, ok := have[k]; ok && slices.Equal(old.Backends, bs) && old.Affinity == affinity {
			continue
		}
		s := datapath.Service{ServiceKey: k, Backends: bs, Affinity: affinity}
		if err := c.w.UpsertService(s); err != nil {
			c.countWriteError(err)
			if errors.Is(err, datapath.ErrServiceMapFull) {
				c.log.Error("service map full: this Service is not load-balanced on this node until others are deleted", "service", key, "address", k, "err", err)
			}
			errs = append(errs, err)
			continue
		}
		if have == nil {
			have = map[datapath.ServiceKey]datapath.Service{}
			c.written[key] = have
		}
		have[k] = s
		c.names[k] = key
	}
	for k := range have {
		if _, ok := want[k]; ok {
			continue
		}
		if err := c.w.DeleteService(k); err != nil {
			c.countWriteError(err)
			errs = append(errs, err)
			continue
		}
		delete(have, k)
		if c.names[k] == key {
			delete(c.names, k)
		}
	}
	if len(have) == 0 {
		delete(c.written, key)
	}
	return errors.Join(errs...)
}

// apiServerService is the Service in front of the API server.
const apiServerService = "default/kubernetes"

// keepAPIServerBackends keeps the last backends of an API server Service
// port that has lost all of them. An API server that shuts down takes
// itself out of default/kubernetes, and the agent's own connections to the
// API server go through this map: emptied, it would refuse them at the
// Service's address, and the agent would never see an API server come back
// (a single control plane restarting). The kept backends give way to any
// the API server publishes again, and go with the Service. c.mu is held.
func (c *Controller) keepAPIServerBackends(have map[datapath.ServiceKey]datapath.Service, want map[datapath.ServiceKey][]datapath.Backend) {
	for k, bs := range want {
		if old, ok := have[k]; ok && len(bs) == 0 && len(old.Backends) > 0 {
			want[k] = old.Backends
			c.log.Warn("the API server's Service lost all its endpoints: keeping the last ones so this node can reach an API server that comes back",
				"service", apiServerService, "address", k, "backends", len(old.Backends))
		}
	}
}

// noteProblems logs, once per change, the ports of a Service that have no
// backends although the Service has endpoints (a target port name no
// backend declares), and keeps them for Problems. svc is nil once the
// Service is gone. c.mu is held.
func (c *Controller) noteProblems(key string, svc *corev1.Service, want map[datapath.ServiceKey][]datapath.Backend) {
	now := map[string]string{}
	if svc != nil {
		for k, bs := range want {
			if len(bs) > 0 {
				continue
			}
			for _, sp := range svc.Spec.Ports {
				if uint16(sp.Port) != k.Port || protocol(sp.Protocol) != k.Proto {
					continue
				}
				sel := labels.SelectorFromSet(labels.Set{discoveryv1.LabelServiceName: svc.Name})
				eps, err := c.slices.EndpointSlices(svc.Namespace).List(sel)
				if err != nil {
					continue
				}
				if _, p := backendViews(sp, eps, false, ""); p != "" {
					now[fmt.Sprintf("%d/%s", sp.Port, cmp.Or(sp.Protocol, corev1.ProtocolTCP))] = p
				}
			}
		}
	}
	old := c.problems[key]
	for port, p := range now {
		if old[port] != p {
			c.log.Warn("service port has no backends", "service", key, "port", port, "problem", p)
		}
	}
	if len(now) == 0 {
		delete(c.problems, key)
	} else {
		c.problems[key] = now
	}
}

// NameOf names the Service (namespace/name) whose entry k is.
func (c *Controller) NameOf(k datapath.ServiceKey) (string, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	n, ok := c.names[k]
	return n, ok
}

// WithoutBackends counts the Service addresses (cluster IP, port,
// protocol) written without backends, whose clients are refused. External
// frontends are not counted: with externalTrafficPolicy Local, most nodes
// have no backend for them by design.
func (c *Controller) WithoutBackends() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, entries := range c.written {
		for _, s := range entries {
			if len(s.Backends) == 0 && !s.External {
				n++
			}
		}
	}
	return n
}

// Problems counts the Service ports that have no backends although their
// Service has endpoints.
func (c *Controller) Problems() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, ps := range c.problems {
		n += len(ps)
	}
	return n
}

// Entries computes a Service's map entries from its EndpointSlices: one per
// IPv4 cluster IP and Service port, with the endpoints that can serve it.
// Named target ports need nothing here: the EndpointSlice controller
// resolves them per pod and publishes each slice's ports under the Service
// port's name. An endpoint is a backend when it is ready, or (marked
// terminating) when it is serving and terminating, which the datapath uses
// only when no ready backend is left. With internalTrafficPolicy Local only
// endpoints on node count. Headless and ExternalName Services have none.
func Entries(svc *corev1.Service, eps []*discoveryv1.EndpointSlice, node string) map[datapath.ServiceKey][]datapath.Backend {
	out := map[datapath.ServiceKey][]datapath.Backend{}
	if svc.Spec.Type == corev1.ServiceTypeExternalName {
		return out
	}
	local := svc.Spec.InternalTrafficPolicy != nil && *svc.Spec.InternalTrafficPolicy == corev1.ServiceInternalTrafficPolicyLocal
	ips := svc.Spec.ClusterIPs
	if len(ips) == 0 && svc.Spec.ClusterIP != "" {
		ips = []string{svc.Spec.ClusterIP}
	}
	for _, ipStr := range ips {
		vip, err := netip.ParseAddr(ipStr)
		if err != nil || !vip.Is4() {
			continue // "None" (headless), or an IPv6 family
		}
		for _, sp := range svc.Spec.Ports {
			proto := protocol(sp.Protocol)
			if proto == 0 {
				continue
			}
			k := datapath.ServiceKey{VIP: vip, Port: uint16(sp.Port), Proto: proto}
			out[k] = backends(sp, eps, local, node)
		}
	}
	return out
}

// entries are the map entries the controller writes for a Service.
func (c *Controller) entries(svc *corev1.Service, eps []*discoveryv1.EndpointSlice) map[datapath.ServiceKey][]datapath.Backend {
	out := Entries(svc, eps, c.cfg.NodeName)
	if c.cfg.NodePort {
		maps.Copy(out, ExternalEntries(svc, eps, c.cfg.NodeName))
	}
	return out
}

// ExternalEntries computes a Service's external frontends (ServiceKey
// External): for every Service port, its NodePort (VIP NodePortVIP: any
// address of the node) and every IPv4 LoadBalancer ingress IP and external
// IP at the Service port. With externalTrafficPolicy Local only endpoints on
// node serve them, and a node without one writes the frontend without
// backends (the datapath leaves such traffic to the host stack, which
// refuses it). ClusterIP-only, headless and ExternalName Services have
// none but their external IPs.
func ExternalEntries(svc *corev1.Service, eps []*discoveryv1.EndpointSlice, node string) map[datapath.ServiceKey][]datapath.Backend {
	out := map[datapath.ServiceKey][]datapath.Backend{}
	if svc.Spec.Type == corev1.ServiceTypeExternalName {
		return out
	}
	local := svc.Spec.ExternalTrafficPolicy == corev1.ServiceExternalTrafficPolicyLocal
	var ips []netip.Addr
	for _, s := range svc.Spec.ExternalIPs {
		if ip, err := netip.ParseAddr(s); err == nil && ip.Is4() {
			ips = append(ips, ip)
		}
	}
	if svc.Spec.Type == corev1.ServiceTypeLoadBalancer {
		for _, in := range svc.Status.LoadBalancer.Ingress {
			if ip, err := netip.ParseAddr(in.IP); err == nil && ip.Is4() {
				ips = append(ips, ip)
			}
		}
	}
	nodePorts := svc.Spec.Type == corev1.ServiceTypeNodePort || svc.Spec.Type == corev1.ServiceTypeLoadBalancer
	for _, sp := range svc.Spec.Ports {
		proto := protocol(sp.Protocol)
		if proto == 0 {
			continue
		}
		bs := backends(sp, eps, local, node)
		if nodePorts && sp.NodePort > 0 && sp.NodePort <= 65535 {
			out[datapath.ServiceKey{VIP: datapath.NodePortVIP, Port: uint16(sp.NodePort), Proto: proto, External: true}] = bs
		}
		for _, ip := range ips {
			out[datapath.ServiceKey{VIP: ip, Port: uint16(sp.Port), Proto: proto, External: true}] = bs
		}
	}
	return out
}

// DefaultAffinity is sessionAffinity ClientIP's timeout when the Service
// names none (Kubernetes' default, three hours).
const DefaultAffinity = 10800 * time.Second

// Affinity is a Service's sessionAffinity ClientIP timeout, or 0 without
// session affinity. A timeout out of the API's range (1 to 86400 seconds;
// the API server refuses others) is brought into it.
func Affinity(svc *corev1.Service) time.Duration {
	if svc.Spec.SessionAffinity != corev1.ServiceAffinityClientIP {
		return 0
	}
	cfg := svc.Spec.SessionAffinityConfig
	if cfg == nil || cfg.ClientIP == nil || cfg.ClientIP.TimeoutSeconds == nil {
		return DefaultAffinity
	}
	d := time.Duration(*cfg.ClientIP.TimeoutSeconds) * time.Second
	return min(max(d, time.Second), datapath.MaxAffinity)
}

func backends(sp corev1.ServicePort, eps []*discoveryv1.EndpointSlice, local bool, node string) []datapath.Backend {
	views, _ := backendViews(sp, eps, local, node)
	var out []datapath.Backend
	for _, v := range views {
		out = append(out, datapath.Backend{IP: v.IP, Port: v.Port, Terminating: v.Terminating})
	}
	return out
}

// backendViews are the endpoints that can serve a Service port, sorted by
// address, with a problem when the Service's slices have endpoints but none
// for this port (a target port name no backend declares).
func backendViews(sp corev1.ServicePort, eps []*discoveryv1.EndpointSlice, local bool, node string) ([]BackendView, string) {
	seen := map[netip.AddrPort]int{}
	var out []BackendView
	matched, endpoints := false, 0
	for _, s := range eps {
		if s.AddressType != discoveryv1.AddressTypeIPv4 {
			continue
		}
		endpoints += len(s.Endpoints)
		port, ok := slicePort(s, sp)
		if !ok {
			continue
		}
		matched = true
		for _, ep := range s.Endpoints {
			if len(ep.Addresses) == 0 || (local && (ep.NodeName == nil || *ep.NodeName != node)) {
				continue
			}
			ready := ep.Conditions.Ready == nil || *ep.Conditions.Ready
			// serving unset: older producers; it then means ready.
			serving := ready
			if ep.Conditions.Serving != nil {
				serving = *ep.Conditions.Serving
			}
			terminating := ep.Conditions.Terminating != nil && *ep.Conditions.Terminating
			if !ready && !(serving && terminating) {
				continue
			}
			// Consumers use the first address (discovery/v1 API doc).
			ip, err := netip.ParseAddr(ep.Addresses[0])
			if err != nil || !ip.Is4() {
				continue
			}
			b := BackendView{IP: ip, Port: port, Terminating: !ready}
			if ep.NodeName != nil {
				b.Node = *ep.NodeName
			}
			if r := ep.TargetRef; r != nil && r.Kind == "Pod" {
				b.Pod = r.Namespace + "/" + r.Name
			}
			ap := netip.AddrPortFrom(ip, port)
			// An endpoint may sit in two slices while it moves; ready wins.
			if i, dup := seen[ap]; dup {
				out[i].Terminating = out[i].Terminating && b.Terminating
				continue
			}
			seen[ap] = len(out)
			out = append(out, b)
		}
	}
	slices.SortFunc(out, func(a, b BackendView) int {
		return cmp.Or(a.IP.Compare(b.IP), cmp.Compare(a.Port, b.Port))
	})
	var problem string
	if !matched && endpoints > 0 {
		target := sp.TargetPort.String()
		if sp.TargetPort.Type == intstr.String {
			problem = fmt.Sprintf("no endpoint declares target port %q (%d endpoints in the Service's slices)", target, endpoints)
		} else {
			problem = fmt.Sprintf("no endpoint serves port %q (%d endpoints in the Service's slices)", cmp.Or(sp.Name, target), endpoints)
		}
	}
	return out, problem
}

// slicePort finds the slice's port for a Service port: the same name and
// protocol (an unnamed Service port matches an unnamed slice port).
func slicePort(s *discoveryv1.EndpointSlice, sp corev1.ServicePort) (uint16, bool) {
	for _, p := range s.Ports {
		name := ""
		if p.Name != nil {
			name = *p.Name
		}
		pr := corev1.ProtocolTCP
		if p.Protocol != nil {
			pr = *p.Protocol
		}
		if name == sp.Name && pr == cmp.Or(sp.Protocol, corev1.ProtocolTCP) && p.Port != nil && *p.Port > 0 {
			return uint16(*p.Port), true
		}
	}
	return 0, false
}

func protocol(p corev1.Protocol) uint8 {
	switch cmp.Or(p, corev1.ProtocolTCP) {
	case corev1.ProtocolTCP:
		return 6
	case corev1.ProtocolUDP:
		return 17
	case corev1.ProtocolSCTP:
		return 132
	}
	return 0
}
