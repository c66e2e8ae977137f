package k8s

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"time"
	"unique"

	corev1 "k8s.io/api/core/v1"
)

// A checkpoint of the pod cache lets a restarted agent resume from its own
// copy instead of listing every pod of the cluster again (at 150,000 pods
// that list is 659 MiB to decode): the pods as the cache held them, and a
// resource version up to which the cache held every event, so that a watch
// from it brings the copy up to date.
//
// The file is small and binary: a magic, a format version, the body, and a
// CRC-32C of everything before it. Strings repeated across pods (namespaces,
// nodes, service accounts, label keys and values, port names) are written
// once and then referred to by number; label sets shared by pods (see
// labelInterner) likewise.

// CheckpointFile is the checkpoint's name in the agent's state directory.
const CheckpointFile = "pod-cache.ckpt"

const (
	checkpointMagic = "VEILPODC"
	// checkpointVersion 2 writes PodInfo as it is packed (the resource
	// version and an IPv4 address as numbers, the rare fields apart);
	// version 1 wrote them as strings.
	checkpointVersion = 2
	// maxCheckpointBytes bounds what a read accepts: about 60 bytes a pod
	// at 150,000 pods is 9 MiB.
	maxCheckpointBytes = 1 << 30
)

// ErrCheckpointCorrupt says a checkpoint file is not one this agent can
// read: truncated, its checksum wrong, or not a checkpoint at all.
var ErrCheckpointCorrupt = errors.New("pod cache checkpoint is corrupt")

// ErrCheckpointVersion says a checkpoint was written in a format this agent
// does not read (by another version of the agent).
var ErrCheckpointVersion = errors.New("pod cache checkpoint has an unknown format version")

// Checkpoint is the pod cache at one resource version.
type Checkpoint struct {
	// ResourceVersion is a lower bound: the pods hold every event up to it
	// (and maybe some after it).
	ResourceVersion string
	// Written is when the checkpoint was taken; Node the agent's node.
	Written time.Time
	Node    string
	// ClusterID names the cluster the pods are of: the UID of its
	// namespace "default", which the API server creates once. A
	// checkpoint of another cluster (one rebuilt under the node) is not
	// resumed from: its versions mean nothing there.
	ClusterID string
	Pods      []*PodInfo
}

// The fields the codec writes (see encoder.pod for the order).
// TestCheckpointCoversPodInfo fails when PodInfo, podRare or NamedPort
// gains a field not listed here: a field the checkpoint dropped would be
// lost on every resume.
var (
	checkpointPodFields  = []string{"key", "labels", "ports", "rare", "namespace", "nodeName", "serviceAccount", "rv", "ip4", "bits"}
	checkpointRareFields = []string{"annotations", "podIPs", "podIP", "resourceVersion", "phase"}
	checkpointPortFields = []string{"Container", "Name", "Port", "Protocol"}
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// encoder writes the body; strings and label sets seen before are
// references.
type encoder struct {
	buf     []byte
	strings map[string]uint64
	sets    map[uintptr]uint64
}

func (e *encoder) uvarint(v uint64) { e.buf = binary.AppendUvarint(e.buf, v) }

// raw writes a string no other pod shares (a name, an address).
func (e *encoder) raw(s string) {
	e.uvarint(uint64(len(s)))
	e.buf = append(e.buf, s...)
}

// str writes 0 and the string the first time, its number+1 after.
func (e *encoder) str(s string) {
	if i, ok := e.strings[s]; ok {
		e.uvarint(i + 1)
		return
	}
	e.strings[s] = uint64(len(e.strings))
	e.uvarint(0)
	e.raw(s)
}

func (e *encoder) stringMap(m map[string]string) {
	e.uvarint(uint64(len(m)))
	for k, v := range m {
		e.str(k)
		e.str(v)
	}
}

// labels writes a label set: 0 for none, 1 and the set the first time, its
// number+2 after.
func (e *encoder) labels(m map[string]string) {
	if len(m) == 0 {
		e.uvarint(0)
		return
	}
	p := reflect.ValueOf(m).Pointer()
	if i, ok := e.sets[p]; ok {
		e.uvarint(i + 2)
		return
	}
	e.sets[p] = uint64(len(e.sets))
	e.uvarint(1)
	e.stringMap(m)
}

func (e *encoder) pod(p *PodInfo) {
	e.str(p.Namespace())
	e.raw(p.Name())
	e.uvarint(p.rv)
	e.uvarint(uint64(p.bits))
	if p.bits&podIPIs4 != 0 {
		e.buf = append(e.buf, p.ip4[:]...)
	}
	e.labels(p.labels)
	e.str(p.NodeName())
	e.str(p.ServiceAccount())
	ports := p.Ports()
	e.uvarint(uint64(len(ports)))
	for _, np := range ports {
		e.str(np.Container)
		e.str(np.Name)
		e.uvarint(uint64(uint32(np.Port)))
		e.str(string(np.Protocol))
	}
	if p.rare == nil {
		e.uvarint(0)
		return
	}
	e.uvarint(1)
	r := p.rare
	e.stringMap(r.annotations)
	e.uvarint(uint64(len(r.podIPs)))
	for _, ip := range r.podIPs {
		e.raw(ip)
	}
	e.raw(r.podIP)
	e.raw(r.resourceVersion)
	e.str(string(r.phase))
}

// MarshalCheckpoint encodes c.
func MarshalCheckpoint(c *Checkpoint) []byte {
	e := &encoder{buf: make([]byte, 0, 64+64*len(c.Pods)), strings: map[string]uint64{}, sets: map[uintptr]uint64{}}
	e.buf = append(e.buf, checkpointMagic...)
	e.uvarint(checkpointVersion)
	e.buf = binary.AppendVarint(e.buf, c.Written.UnixNano())
	e.raw(c.ResourceVersion)
	e.raw(c.Node)
	e.raw(c.ClusterID)
	e.uvarint(uint64(len(c.Pods)))
	for _, p := range c.Pods {
		e.pod(p)
	}
	return binary.LittleEndian.AppendUint32(e.buf, crc32.Checksum(e.buf, castagnoli))
}

// decoder reads the body; the first error sticks and every read after it
// returns zero values.
type decoder struct {
	b       []byte
	err     error
	strings []string
	// handles[i] is strings[i] interned, once asked for.
	handles []unique.Handle[string]
	sets    []map[string]string
	key     []byte
}

func (d *decoder) fail(what string) {
	if d.err == nil {
		d.err = fmt.Errorf("%w: bad %s at %d bytes from the end", ErrCheckpointCorrupt, what, len(d.b))
	}
}

func (d *decoder) uvarint(what string) uint64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.fail(what)
		return 0
	}
	d.b = d.b[n:]
	return v
}

// count reads a number of items that each take at least one byte.
func (d *decoder) count(what string) int {
	n := d.uvarint(what)
	if n > uint64(len(d.b)) {
		d.fail(what)
		return 0
	}
	return int(n)
}

// rawBytes reads a string's bytes, which stay the file's.
func (d *decoder) rawBytes(what string) []byte {
	n := d.count(what)
	if d.err != nil {
		return nil
	}
	b := d.b[:n]
	d.b = d.b[n:]
	return b
}

func (d *decoder) raw(what string) string { return string(d.rawBytes(what)) }

// strIndex reads a string written by encoder.str and returns its index
// in d.strings, or -1 after an error.
func (d *decoder) strIndex(what string) int {
	i := d.uvarint(what)
	if d.err != nil {
		return -1
	}
	if i == 0 {
		// Shared with the pods that arrive later, as compactPod shares
		// them.
		d.strings = append(d.strings, intern(d.raw(what)))
		d.handles = append(d.handles, unique.Handle[string]{})
		return len(d.strings) - 1
	}
	if i > uint64(len(d.strings)) {
		d.fail(what + " reference")
		return -1
	}
	return int(i - 1)
}

func (d *decoder) str(what string) string {
	if i := d.strIndex(what); i >= 0 {
		return d.strings[i]
	}
	return ""
}

// handle reads a string written by encoder.str, interned as a handle.
func (d *decoder) handle(what string) unique.Handle[string] {
	i := d.strIndex(what)
	if i < 0 {
		return unique.Handle[string]{}
	}
	if d.handles[i] == (unique.Handle[string]{}) {
		d.handles[i] = handle(d.strings[i])
	}
	return d.handles[i]
}

func (d *decoder) stringMap(what string) map[string]string {
	n := d.count(what)
	if n == 0 || d.err != nil {
		return nil
	}
	m := make(map[string]string, n)
	for range n {
		k := d.str(what + " key")
		m[k] = d.str(what + " value")
	}
	return m
}

func (d *decoder) labels() map[string]string {
	switch i := d.uvarint("labels"); {
	case d.err != nil || i == 0:
		return nil
	case i == 1:
		m := d.stringMap("labels")
		d.sets = append(d.sets, m)
		return m
	case i-2 < uint64(len(d.sets)):
		return d.sets[i-2]
	}
	d.fail("label set reference")
	return nil
}

func (d *decoder) pod() *PodInfo {
	p := &PodInfo{namespace: d.handle("namespace")}
	// The store key in one string, the name its tail (see PodInfo).
	name := d.rawBytes("name")
	if ns := p.Namespace(); ns != "" {
		d.key = append(append(append(d.key[:0], ns...), '/'), name...)
		p.key = string(d.key)
	} else {
		p.key = string(name)
	}
	p.rv = d.uvarint("resource version")
	bits := d.uvarint("flags")
	if bits > phaseMask|hostNetwork|podIPIs4 || int(bits&phaseMask) >= len(phases) && bits&phaseMask != phaseOther {
		d.fail("flags")
	}
	p.bits = uint8(bits)
	if p.bits&podIPIs4 != 0 {
		if len(d.b) < 4 {
			d.fail("pod IP")
		} else {
			p.ip4 = [4]byte(d.b[:4])
			d.b = d.b[4:]
		}
	}
	p.labels = d.labels()
	p.nodeName, p.serviceAccount = d.handle("node name"), d.handle("service account")
	if n := d.count("ports"); n > 0 {
		ports := make([]NamedPort, n)
		for i := range ports {
			np := &ports[i]
			np.Container, np.Name = d.str("port container"), d.str("port name")
			port := d.uvarint("port")
			if port > 1<<32-1 {
				d.fail("port")
			}
			np.Port = int32(uint32(port))
			np.Protocol = corev1.Protocol(d.str("port protocol"))
		}
		p.ports = &ports
	}
	switch d.uvarint("rare fields") {
	case 0:
	case 1:
		r := &podRare{annotations: d.stringMap("annotations")}
		if n := d.count("pod IPs"); n > 0 {
			r.podIPs = make([]string, n)
			for i := range r.podIPs {
				r.podIPs[i] = d.raw("pod IP")
			}
		}
		r.podIP, r.resourceVersion, r.phase = d.raw("pod IP"), d.raw("resource version"), corev1.PodPhase(d.str("phase"))
		p.rare = r
	default:
		d.fail("rare fields")
	}
	if d.err == nil && p.bits&phaseMask == phaseOther && (p.rare == nil || p.rare.phase == "") {
		d.fail("phase")
	}
	return p
}

// UnmarshalCheckpoint decodes b. Its errors wrap ErrCheckpointCorrupt or
// ErrCheckpointVersion.
func UnmarshalCheckpoint(b []byte) (*Checkpoint, error) {
	if len(b) < len(checkpointMagic)+4 || string(b[:len(checkpointMagic)]) != checkpointMagic {
		return nil, fmt.Errorf("%w: not a pod cache checkpoint (%d bytes, no magic)", ErrCheckpointCorrupt, len(b))
	}
	body, sum := b[:len(b)-4], binary.LittleEndian.Uint32(b[len(b)-4:])
	d := &decoder{b: body[len(checkpointMagic):]}
	// The version before the checksum: a later format may checksum
	// differently, and its file is then not corrupt but unknown.
	if v := d.uvarint("format version"); d.err == nil && v != checkpointVersion {
		return nil, fmt.Errorf("%w: version %d, this agent reads %d", ErrCheckpointVersion, v, checkpointVersion)
	}
	if got := crc32.Checksum(body, castagnoli); got != sum {
		return nil, fmt.Errorf("%w: checksum %08x, the file says %08x (truncated or damaged)", ErrCheckpointCorrupt, got, sum)
	}
	c := &Checkpoint{}
	if d.err == nil {
		written, n := binary.Varint(d.b)
		if n <= 0 {
			d.fail("time written")
		} else {
			d.b = d.b[n:]
			c.Written = time.Unix(0, written)
		}
	}
	c.ResourceVersion = d.raw("resource version")
	c.Node = d.raw("node")
	c.ClusterID = d.raw("cluster ID")
	n := d.count("pod count")
	if d.err == nil {
		c.Pods = make([]*PodInfo, 0, n)
	}
	for i := 0; i < n && d.err == nil; i++ {
		c.Pods = append(c.Pods, d.pod())
	}
	if d.err == nil && len(d.b) != 0 {
		d.fail("end (bytes after the last pod)")
	}
	if d.err != nil {
		return nil, d.err
	}
	return c, nil
}

// WriteCheckpoint writes c to path atomically: a temporary file beside it,
// synced, renamed over it (mode 0600), and the directory synced, so a crash
// leaves the old checkpoint or the new one, never a part.
func WriteCheckpoint(path string, c *Checkpoint) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("write pod cache checkpoint: %w", err)
	}
	tmp := f.Name()
	err = func() error {
		defer f.Close()
		if err := f.Chmod(0o600); err != nil {
			return err
		}
		w := bufio.NewWriterSize(f, 1<<20)
		if _, err := w.Write(MarshalCheckpoint(c)); err != nil {
			return err
		}
		if err := w.Flush(); err != nil {
			return err
		}
		if err := f.Sync(); err != nil {
			return err
		}
		return f.Close()
	}()
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write pod cache checkpoint %s: %w", path, err)
	}
	if d, err := os.Open(dir); err == nil {
		// The rename is durable once the directory is.
		err = d.Sync()
		d.Close()
		if err != nil {
			return fmt.Errorf("sync %s after writing the pod cache checkpoint: %w", dir, err)
		}
	}
	return nil
}

// ReadCheckpoint reads the checkpoint at path. A missing file is an error
// for which errors.Is(err, os.ErrNotExist) holds; a damaged one wraps
// ErrCheckpointCorrupt, one of another format ErrCheckpointVersion.
func ReadCheckpoint(path string) (*Checkpoint, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read pod cache checkpoint: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxCheckpointBytes+1))
	if err != nil {
		return nil, fmt.Errorf("read pod cache checkpoint %s: %w", path, err)
	}
	if len(b) > maxCheckpointBytes {
		return nil, fmt.Errorf("read pod cache checkpoint %s: %w: larger than %d bytes", path, ErrCheckpointCorrupt, maxCheckpointBytes)
	}
	c, err := UnmarshalCheckpoint(b)
	if err != nil {
		return nil, fmt.Errorf("read pod cache checkpoint %s: %w", path, err)
	}
	return c, nil
}
