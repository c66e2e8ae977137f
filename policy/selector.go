package policy

import (
	"net/netip"
	"slices"
	"strings"

	"k8s.io/apimachinery/pkg/labels"

	"github.com/veilmesh/veil/policy/identity"
)

// selKind says how a peer selector picks identities.
type selKind uint8

const (
	// selLabels picks pod identities by pod and namespace labels.
	selLabels selKind = iota
	// selAllPods picks every pod identity (entity cluster, and egress
	// named ports towards any peer: only pods have named ports).
	selAllPods
	// selCIDR picks the CIDR identities of the regions a CIDR with excepts
	// covers.
	selCIDR
)

// selector is one distinct peer selector, shared by every rule that names
// it, with the identities it currently picks. Rules hold selectors rather
// than identity lists so that a new or vanished identity updates one
// selector and dirties exactly the groups that used it.
type selector struct {
	key  string
	kind selKind
	// namespace restricts selLabels to one namespace; when empty, nsSel
	// (nil = every namespace) does.
	namespace string
	nsSel     labels.Selector
	podSel    labels.Selector
	cidr      netip.Prefix
	except    []netip.Prefix

	refs int // policies naming it
	ids  map[identity.ID]struct{}
	// sorted is ids in order, rebuilt lazily.
	sorted []identity.ID
	users  map[*group]struct{}
}

func labelSelectorKey(namespace string, nsSel, podSel labels.Selector) string {
	var b strings.Builder
	b.WriteString("L|")
	if namespace != "" {
		b.WriteString("ns=" + namespace)
	} else if nsSel != nil {
		b.WriteString("nssel=" + nsSel.String())
	} else {
		b.WriteString("allns")
	}
	b.WriteString("|")
	b.WriteString(podSel.String())
	return b.String()
}

func cidrSelectorKey(cidr netip.Prefix, except []netip.Prefix) string {
	var b strings.Builder
	b.WriteString("C|" + cidr.String())
	for _, e := range except {
		b.WriteString("|" + e.String())
	}
	return b.String()
}

const allPodsKey = "P|"

// matchesIdentity reports whether a label or all-pods selector picks ident.
func (s *selector) matchesIdentity(id *identState) bool {
	switch s.kind {
	case selAllPods:
		return true
	case selLabels:
		if s.namespace != "" {
			if id.namespace != s.namespace {
				return false
			}
		} else if s.nsSel != nil && !s.nsSel.Matches(id.nsLabels) {
			return false
		}
		return s.podSel.Matches(id.podLabels)
	}
	return false
}

// matchesRegion reports whether a CIDR selector picks region r: cidr holds
// r and no except holds r. Because r is the longest named prefix holding
// an address, this is exactly "the address is in cidr and in no except".
func (s *selector) matchesRegion(r netip.Prefix) bool {
	if !prefixContains(s.cidr, r) {
		return false
	}
	for _, e := range s.except {
		if prefixContains(e, r) {
			return false
		}
	}
	return true
}

// prefixContains reports whether outer ⊇ inner.
func prefixContains(outer, inner netip.Prefix) bool {
	return outer.Addr().Is4() == inner.Addr().Is4() && outer.Bits() <= inner.Bits() && outer.Contains(inner.Addr())
}

func (s *selector) identities() []identity.ID {
	if s.sorted == nil {
		s.sorted = make([]identity.ID, 0, len(s.ids))
		for id := range s.ids {
			s.sorted = append(s.sorted, id)
		}
		slices.Sort(s.sorted)
	}
	return s.sorted
}

// set updates whether id is picked and reports a change.
func (s *selector) set(id identity.ID, in bool) bool {
	_, had := s.ids[id]
	if had == in {
		return false
	}
	if in {
		s.ids[id] = struct{}{}
	} else {
		delete(s.ids, id)
	}
	s.sorted = nil
	return true
}
