package daemon

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/vishvananda/netlink"

	"github.com/veilmesh/veil/agent/cni"
	"github.com/veilmesh/veil/policy"
)

// RegisterEndpoint makes a freshly wired pod an endpoint: the compiler
// learns its address, and its datapath record and policy are written before
// this returns, so the pod's first packet is already policed.
func (d *Daemon) RegisterEndpoint(ctx context.Context, info cni.EndpointInfo) error {
	id := policy.EndpointID{Namespace: info.Namespace, Name: info.Name}
	d.mu.Lock()
	if old, ok := d.local[id]; ok && old.ContainerID != info.ContainerID {
		d.mu.Unlock()
		return fmt.Errorf("register endpoint %s: already wired for container %s", id, old.ContainerID)
	}
	ep := d.local[id]
	if ep == nil {
		ep = &localEndpoint{Pod: id, ContainerID: info.ContainerID, ID: d.allocEndpointID()}
		d.local[id] = ep
	}
	ep.IP, ep.HostVeth, ep.HostIfindex = info.IP, info.HostVeth, info.HostIfindex
	ep.HostMAC, ep.PodMAC = info.HostMAC.String(), info.PodMAC.String()
	ep.Netns = info.Netns
	ep.Identity = 0 // force the datapath write below
	d.mu.Unlock()
	d.dirty.Store(true)

	// The informer may not have the Pod yet: ask the API server once, so
	// the policy is right from the first packet.
	pod, err := d.pods.Pods(info.Namespace).Get(info.Name)
	if apierrors.IsNotFound(err) {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		pod, err = d.kube.CoreV1().Pods(info.Namespace).Get(cctx, info.Name, metav1.GetOptions{})
		cancel()
	}
	if err == nil {
		if err := d.apply(d.compiler.UpsertPod(d.withLocalIP(pod))); err != nil {
			return fmt.Errorf("register endpoint %s: %w", id, err)
		}
	} else {
		d.log.Warn("pod of new endpoint unknown; it stays unmanaged until the pod appears", "pod", id, "error", err)
	}
	if err := d.writeEndpoint(ep); err != nil {
		return fmt.Errorf("register endpoint %s: %w", id, err)
	}
	return d.flushIPCache()
}

// UnregisterEndpoint forgets the endpoint of a container and removes it from
// the datapath. An unknown container is not an error (CNI DEL is idempotent).
func (d *Daemon) UnregisterEndpoint(ctx context.Context, containerID string) error {
	d.mu.Lock()
	var ep *localEndpoint
	for _, e := range d.local {
		if e.ContainerID == containerID {
			ep = e
			break
		}
	}
	if ep != nil {
		delete(d.local, ep.Pod)
	}
	d.mu.Unlock()
	if ep == nil {
		return nil
	}
	d.dirty.Store(true)
	if err := d.dp.DeleteEndpoint(ep.IP); err != nil {
		return fmt.Errorf("unregister endpoint %s: %w", ep.Pod, err)
	}
	// The pod keeps its API object for a while; without a local address the
	// compiler drops it as an endpoint.
	var err error
	if pod, gerr := d.pods.Pods(ep.Pod.Namespace).Get(ep.Pod.Name); gerr == nil {
		err = d.apply(d.compiler.UpsertPod(d.withLocalIP(pod)))
	} else {
		err = d.apply(d.compiler.DeletePod(ep.Pod.Namespace, ep.Pod.Name))
	}
	return errors.Join(err, d.flushIPCache())
}

// allocEndpointID returns an id no local endpoint holds. Callers hold d.mu.
func (d *Daemon) allocEndpointID() uint32 {
	used := map[uint32]bool{}
	for _, e := range d.local {
		used[e.ID] = true
	}
	for used[d.nextID] || d.nextID == 0 || d.nextID >= 1<<31 {
		d.nextID++
		if d.nextID >= 1<<31 {
			d.nextID = 1
		}
	}
	id := d.nextID
	d.nextID++
	return id
}

// restoreEndpoints re-adopts the endpoints of the previous run and removes
// datapath endpoints nobody owns (left by a crash between two writes).
func (d *Daemon) restoreEndpoints(st *persisted) error {
	known := map[netip.Addr]bool{}
	d.mu.Lock()
	for _, ep := range st.Endpoints {
		d.local[ep.Pod] = ep
		known[ep.IP] = true
		if ep.ID >= d.nextID {
			d.nextID = ep.ID + 1
		}
	}
	d.mu.Unlock()
	eps, err := d.dp.Endpoints()
	if err != nil {
		return err
	}
	var errs []error
	for _, ep := range eps {
		if !known[ep.IP] {
			d.log.Warn("removing datapath endpoint that no pod owns", "ip", ep.IP, "id", ep.ID)
			errs = append(errs, d.dp.DeleteEndpoint(ep.IP))
		}
	}
	if len(st.Endpoints) > 0 {
		d.log.Info("restored endpoints", "count", len(st.Endpoints))
	}
	return errors.Join(errs...)
}

// deviceWithAddr names the interface that holds ip.
func deviceWithAddr(ip netip.Addr) (string, error) {
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_V4)
	if err != nil {
		return "", fmt.Errorf("list addresses: %w", err)
	}
	for _, a := range addrs {
		if a.IP.Equal(ip.AsSlice()) {
			l, err := netlink.LinkByIndex(a.LinkIndex)
			if err != nil {
				return "", fmt.Errorf("find device of %s: %w", ip, err)
			}
			return l.Attrs().Name, nil
		}
	}
	return "", fmt.Errorf("no interface holds the node IP %s: set --underlay-interface or --node-ip", ip)
}

var _ cni.EndpointRegistrar = (*Daemon)(nil)
