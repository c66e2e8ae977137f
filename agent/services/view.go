package services

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/labels"
)

// ServiceView is a Service as this node load-balances it: what the node's
// informer caches hold, through the same computation that writes the map.
type ServiceView struct {
	Namespace, Name string
	Type            string
	ClusterIPs      []string
	// Affinity is sessionAffinity ClientIP's timeout; 0 without.
	Affinity time.Duration
	// InternalLocal: internalTrafficPolicy Local, so only this node's
	// endpoints are backends.
	InternalLocal bool
	Ports         []PortView
}

// PortView is one Service port and the backends clients are sent to.
type PortView struct {
	Name       string
	Port       uint16
	Protocol   string
	TargetPort string
	Backends   []BackendView
	// Problem says why a port has no backends although the Service has
	// endpoints; empty otherwise.
	Problem string
}

// BackendView is one backend of a Service port.
type BackendView struct {
	IP          netip.Addr
	Port        uint16
	Node        string
	Pod         string // namespace/name, when the endpoint names a pod
	Terminating bool
}

// Ready and terminating counts of a port's backends.
func (p PortView) Counts() (ready, terminating int) {
	for _, b := range p.Backends {
		if b.Terminating {
			terminating++
		} else {
			ready++
		}
	}
	return ready, terminating
}

// View lists the Services of namespace ("" for all) as this node sees
// them, ordered by namespace and name. Headless and ExternalName Services
// are left out: the node has nothing to balance for them.
func (c *Controller) View(namespace string) ([]ServiceView, error) {
	svcs, err := c.services.Services(namespace).List(labels.Everything())
	if err != nil {
		return nil, fmt.Errorf("list services: %w", err)
	}
	var out []ServiceView
	for _, svc := range svcs {
		if len(Entries(svc, nil, c.cfg.NodeName)) == 0 {
			continue
		}
		sel := labels.SelectorFromSet(labels.Set{discoveryv1.LabelServiceName: svc.Name})
		eps, err := c.slices.EndpointSlices(svc.Namespace).List(sel)
		if err != nil {
			return nil, fmt.Errorf("list endpointslices of %s/%s: %w", svc.Namespace, svc.Name, err)
		}
		out = append(out, view(svc, eps, c.cfg.NodeName))
	}
	slices.SortFunc(out, func(a, b ServiceView) int {
		return cmp.Or(strings.Compare(a.Namespace, b.Namespace), strings.Compare(a.Name, b.Name))
	})
	return out, nil
}

func view(svc *corev1.Service, eps []*discoveryv1.EndpointSlice, node string) ServiceView {
	local := svc.Spec.InternalTrafficPolicy != nil && *svc.Spec.InternalTrafficPolicy == corev1.ServiceInternalTrafficPolicyLocal
	v := ServiceView{
		Namespace: svc.Namespace, Name: svc.Name,
		Type:          string(cmp.Or(svc.Spec.Type, corev1.ServiceTypeClusterIP)),
		ClusterIPs:    svc.Spec.ClusterIPs,
		Affinity:      Affinity(svc),
		InternalLocal: local,
	}
	if len(v.ClusterIPs) == 0 && svc.Spec.ClusterIP != "" {
		v.ClusterIPs = []string{svc.Spec.ClusterIP}
	}
	for _, sp := range svc.Spec.Ports {
		if protocol(sp.Protocol) == 0 {
			continue
		}
		bs, problem := backendViews(sp, eps, local, node)
		v.Ports = append(v.Ports, PortView{
			Name: sp.Name, Port: uint16(sp.Port), Protocol: string(cmp.Or(sp.Protocol, corev1.ProtocolTCP)),
			TargetPort: sp.TargetPort.String(), Backends: bs, Problem: problem,
		})
	}
	return v
}
