package datapath

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

type tcDirection int

const (
	ingress tcDirection = iota
	egress
)

func (d tcDirection) String() string {
	if d == egress {
		return "egress"
	}
	return "ingress"
}

// Link pins are named "<name>_<direction>", where name says what the link is
// for: "ep_<ip>" for a pod veth, "netdev_<ifname>" for the underlay. bpffs
// refuses dots in names, so addresses are written with dashes.
func linkPinName(name string, dir tcDirection) string {
	return strings.ReplaceAll(name, ".", "-") + "_" + dir.String()
}

// programFor returns the program a pinned link named like linkPinName runs.
func (d *Datapath) programFor(pinName string) *ebpf.Program {
	switch {
	case strings.HasPrefix(pinName, "ep_") && strings.HasSuffix(pinName, "_ingress"):
		return d.fromPod
	case strings.HasPrefix(pinName, "ep_") && strings.HasSuffix(pinName, "_egress"):
		return d.toPod
	case strings.HasPrefix(pinName, "netdev_") && strings.HasSuffix(pinName, "_ingress"):
		return d.fromNetdev
	case strings.HasPrefix(pinName, "netdev_") && strings.HasSuffix(pinName, "_egress"):
		return d.toNetdev
	case strings.HasPrefix(pinName, "tunnel_"):
		return d.fromTunnel
	}
	return nil
}

// attachTC attaches prog to ifindex in direction dir with TCX, pinning the
// link, or with a clsact filter where TCX is missing (or LegacyTC is set). An
// existing pinned link for the same device is updated in place, so the device
// is never without a program.
func (d *Datapath) attachTC(ifindex int, name string, dir tcDirection, prog *ebpf.Program) error {
	if !d.cfg.LegacyTC {
		err := d.attachTCX(ifindex, name, dir, prog)
		if !errors.Is(err, ebpf.ErrNotSupported) {
			return err
		}
		d.log.Warn("TCX is not supported by this kernel; falling back to clsact", "device", name)
		d.cfg.LegacyTC = true
	}
	return attachClsact(ifindex, dir, prog)
}

func (d *Datapath) attachTCX(ifindex int, name string, dir tcDirection, prog *ebpf.Program) error {
	pin := filepath.Join(linksDir(d.cfg.BPFFSRoot), linkPinName(name, dir))
	if l, err := link.LoadPinnedLink(pin, nil); err == nil {
		info, infoErr := l.Info()
		if infoErr == nil && info.TCX() != nil && int(info.TCX().Ifindex) == ifindex {
			err := l.Update(prog)
			l.Close()
			if err != nil {
				return fmt.Errorf("update %s link on %s: %w", dir, name, err)
			}
			return nil
		}
		// The pin belongs to a device that is gone (a pod recreated with the
		// same address): drop it and attach afresh.
		l.Unpin()
		l.Close()
	}
	attach := ebpf.AttachTCXIngress
	if dir == egress {
		attach = ebpf.AttachTCXEgress
	}
	l, err := link.AttachTCX(link.TCXOptions{Interface: ifindex, Program: prog, Attach: attach})
	if err != nil {
		return fmt.Errorf("attach tcx %s to %s: %w", dir, name, err)
	}
	defer l.Close()
	if err := l.Pin(pin); err != nil {
		return fmt.Errorf("pin tcx %s link of %s: %w", dir, name, err)
	}
	return nil
}

// detachTC removes the program from a device (used when an endpoint goes).
func (d *Datapath) detachTC(ifindex int, name string, dir tcDirection) error {
	pin := filepath.Join(linksDir(d.cfg.BPFFSRoot), linkPinName(name, dir))
	if l, err := link.LoadPinnedLink(pin, nil); err == nil {
		err := l.Unpin()
		l.Close()
		if err != nil {
			return fmt.Errorf("unpin %s link of %s: %w", dir, name, err)
		}
	}
	if d.cfg.LegacyTC && ifindex != 0 {
		return detachClsact(ifindex, dir)
	}
	return nil
}

// repointLinks swaps the freshly loaded programs into every pinned link.
func (d *Datapath) repointLinks() error {
	entries, err := os.ReadDir(linksDir(d.cfg.BPFFSRoot))
	if err != nil {
		return fmt.Errorf("list pinned links: %w", err)
	}
	for _, e := range entries {
		prog := d.programFor(e.Name())
		if prog == nil {
			continue
		}
		path := filepath.Join(linksDir(d.cfg.BPFFSRoot), e.Name())
		l, err := link.LoadPinnedLink(path, nil)
		if err != nil {
			return fmt.Errorf("open pinned link %s: %w", path, err)
		}
		err = l.Update(prog)
		l.Close()
		if err != nil && !errors.Is(err, unix.ENOLINK) {
			return fmt.Errorf("update pinned link %s: %w", path, err)
		}
	}
	return nil
}

// clsact filters: one direct-action BPF filter per direction with a fixed
// handle and priority, so replacing it is atomic.
const (
	clsactHandle   = 0x7e11
	clsactPriority = 1
)

func clsactFilter(ifindex int, dir tcDirection) *netlink.BpfFilter {
	parent := uint32(netlink.HANDLE_MIN_INGRESS)
	if dir == egress {
		parent = netlink.HANDLE_MIN_EGRESS
	}
	return &netlink.BpfFilter{
		FilterAttrs: netlink.FilterAttrs{
			LinkIndex: ifindex,
			Parent:    parent,
			Handle:    clsactHandle,
			Priority:  clsactPriority,
			Protocol:  unix.ETH_P_ALL,
		},
		DirectAction: true,
	}
}

func attachClsact(ifindex int, dir tcDirection, prog *ebpf.Program) error {
	qdisc := &netlink.GenericQdisc{
		QdiscAttrs: netlink.QdiscAttrs{LinkIndex: ifindex, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT},
		QdiscType:  "clsact",
	}
	if err := netlink.QdiscReplace(qdisc); err != nil {
		return fmt.Errorf("add clsact qdisc to ifindex %d: %w", ifindex, err)
	}
	f := clsactFilter(ifindex, dir)
	f.Fd = prog.FD()
	f.Name = "veil"
	if err := netlink.FilterReplace(f); err != nil {
		return fmt.Errorf("add clsact %s filter to ifindex %d: %w", dir, ifindex, err)
	}
	return nil
}

func detachClsact(ifindex int, dir tcDirection) error {
	err := netlink.FilterDel(clsactFilter(ifindex, dir))
	if err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.ENODEV) {
		return fmt.Errorf("remove clsact %s filter from ifindex %d: %w", dir, ifindex, err)
	}
	return nil
}

// detachLegacyAll removes the clsact filters of every endpoint and the underlay.
func (d *Datapath) detachLegacyAll() error {
	var errs []error
	eps, err := d.Endpoints()
	if err != nil {
		return err
	}
	for _, ep := range eps {
		errs = append(errs, detachClsact(ep.Ifindex, ingress), detachClsact(ep.Ifindex, egress))
	}
	if d.underlayIfindex != 0 {
		errs = append(errs, detachClsact(d.underlayIfindex, ingress), detachClsact(d.underlayIfindex, egress))
	}
	if d.wgIfindex != 0 {
		errs = append(errs, detachClsact(d.wgIfindex, ingress))
	}
	return errors.Join(errs...)
}
