package services

import (
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"time"

	"github.com/veilmesh/veil/agent/datapath"
)

// Translations is the socket programs' record of which client was sent to
// which backend in place of which Service address.
type Translations interface {
	LastTranslation(netns uint64, backend netip.AddrPort, proto uint8) (datapath.ServiceTranslation, bool, error)
}

var _ Translations = (*datapath.Datapath)(nil)

// FlowWindow is how soon after a translation a flow between the client and
// that backend is taken to be the translated connection. The record is per
// (client, backend), not per connection: a client that also reaches the
// backend directly within the window is shown as going through the Service.
const FlowWindow = 10 * time.Second

// FlowNamer names the Service a flow's connection went through: the flow
// runs between a local pod and a backend that the socket programs sent
// that pod's network namespace to, in place of a Service, moments before.
type FlowNamer struct {
	Translations Translations
	Services     *Controller
	// Netns is the network namespace path of a local pod's address; false
	// for addresses of no local pod.
	Netns func(netip.Addr) (string, bool)
	// Cookie reads a network namespace's cookie; default
	// datapath.NetnsCookie.
	Cookie func(path string) (uint64, error)
	Log    *slog.Logger

	mu sync.Mutex
	// cookies by namespace path; a path names one pod sandbox.
	cookies map[string]uint64
}

// ServiceVia names the Service client's connection to backend went
// through, as "namespace/name:port"; "" when it went to the pod directly
// (or no record is left).
func (n *FlowNamer) ServiceVia(client netip.Addr, backend netip.AddrPort, proto uint8) string {
	path, ok := n.Netns(client)
	if !ok {
		return ""
	}
	cookie, err := n.cookie(path)
	if err != nil {
		n.log().Debug("no netns cookie for a flow's client", "client", client, "err", err)
		return ""
	}
	tr, ok, err := n.Translations.LastTranslation(cookie, backend, proto)
	if err != nil || !ok || tr.Age > FlowWindow {
		return ""
	}
	name, ok := n.Services.NameOf(datapath.ServiceKey{VIP: tr.Service.Addr(), Port: tr.Service.Port(), Proto: proto})
	if !ok {
		return ""
	}
	return fmt.Sprintf("%s:%d", name, tr.Service.Port())
}

// maxCookies bounds the cookie cache: far more pods than a node runs.
const maxCookies = 4096

func (n *FlowNamer) cookie(path string) (uint64, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if c, ok := n.cookies[path]; ok {
		return c, nil
	}
	read := n.Cookie
	if read == nil {
		read = datapath.NetnsCookie
	}
	c, err := read(path)
	if err != nil {
		return 0, err
	}
	if n.cookies == nil || len(n.cookies) >= maxCookies {
		// Pods come and go; starting over bounds what gone ones leave.
		n.cookies = map[string]uint64{}
	}
	n.cookies[path] = c
	return c, nil
}

func (n *FlowNamer) log() *slog.Logger {
	if n.Log == nil {
		return slog.Default()
	}
	return n.Log
}
