package conformance

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/veilmesh/veil/deploy/ociimage"
)

// hostTool is a program the e2e tests run inside agnhost's container (with
// kubectl exec … /bin/sh -c), copied from the host with the shared
// libraries it loads. Upstream's agnhost image is Alpine with these
// packages; the lab has no registry, so the image is put together from the
// host's Debian packages instead.
type hostTool struct {
	src string // on the host
	dst string // in the image
	pkg string // the Debian package that ships src
}

var hostTools = []hostTool{
	// The tests' shell. Not busybox's: Debian builds it to prefer its own
	// applets to PATH, so its sh would run busybox's nc, not netcat's.
	{src: "/usr/bin/dash", dst: "/bin/sh", pkg: "dash"},
	// wget, nslookup, … : the small tools.
	{src: "/usr/bin/busybox", dst: "/bin/busybox", pkg: "busybox-static"},
	// The e2e framework's probes: curl for HTTP, nc -u/-t -v -w for
	// UDP and TCP (busybox's nc has neither -u nor -v).
	{src: "/usr/bin/curl", dst: "/usr/bin/curl", pkg: "curl"},
	{src: "/usr/bin/nc.openbsd", dst: "/usr/bin/nc", pkg: "netcat-openbsd"},
	// NodePort tests look for listeners with ss; DNS tests query with dig.
	{src: "/usr/bin/ss", dst: "/usr/bin/ss", pkg: "iproute2"},
	{src: "/usr/bin/dig", dst: "/usr/bin/dig", pkg: "bind9-dnsutils"},
	// The DNS tests' glibc querier checks /etc/hosts entries with getent.
	{src: "/usr/bin/getent", dst: "/usr/bin/getent", pkg: "libc-bin"},
}

// AptPackages are the Debian packages the images are built from.
func AptPackages() []string {
	var pkgs []string
	for _, t := range hostTools {
		pkgs = append(pkgs, t.pkg)
	}
	return pkgs
}

// rootfs is the file tree of an image, by absolute path.
type rootfs map[string]fileEntry

type fileEntry struct {
	data     []byte
	mode     os.FileMode // permission bits; with os.ModeDir or os.ModeSymlink for those
	linkname string
}

func (r rootfs) dir(p string, mode os.FileMode) {
	for d := p; d != "/" && d != "."; d = path.Dir(d) {
		if _, ok := r[d]; !ok {
			r[d] = fileEntry{mode: os.ModeDir | 0o755}
		}
	}
	r[p] = fileEntry{mode: os.ModeDir | mode}
}

func (r rootfs) file(p string, data []byte, mode os.FileMode) {
	r.dir(path.Dir(p), 0o755)
	r[p] = fileEntry{data: data, mode: mode}
}

func (r rootfs) symlink(p, target string) {
	r.dir(path.Dir(p), 0o755)
	r[p] = fileEntry{mode: os.ModeSymlink | 0o777, linkname: target}
}

// copyHost adds the host file src at dst, following symlinks.
func (r rootfs) copyHost(src, dst string) error {
	data, err := os.ReadFile(src)
	if err != nil {
		return fmt.Errorf("read %s: %w", src, err)
	}
	r.file(dst, data, 0o755)
	return nil
}

// lddLine matches "libx.so.1 => /lib/…/libx.so.1 (0x…)" and
// "/lib64/ld-linux-x86-64.so.2 (0x…)".
var lddLine = regexp.MustCompile(`^\s*(?:\S+\s+=>\s+)?(/\S+)\s+\(0x[0-9a-f]+\)`)

// sharedLibs returns the shared libraries bin loads, the dynamic loader
// included, as ldd lists them; none for a static binary.
func sharedLibs(ctx context.Context, bin string) ([]string, error) {
	out, err := exec.CommandContext(ctx, "ldd", bin).CombinedOutput()
	if err != nil {
		// ldd exits 1 on a static binary.
		if bytes.Contains(out, []byte("not a dynamic executable")) {
			return nil, nil
		}
		return nil, fmt.Errorf("ldd %s: %w: %s", bin, err, out)
	}
	var libs []string
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		if strings.Contains(sc.Text(), "not found") {
			return nil, fmt.Errorf("ldd %s: %s", bin, strings.TrimSpace(sc.Text()))
		}
		if m := lddLine.FindStringSubmatch(sc.Text()); m != nil {
			libs = append(libs, m[1])
		}
	}
	return libs, nil
}

// agnhostRootfs is agnhost's file tree: agnhost at /agnhost (and
// /agnhost-2, which entrypoint tests use), busybox's applets in /bin, the
// host tools with their libraries, and the files, directories and users
// upstream's image has; source is the k8s.io/kubernetes module's dir.
func agnhostRootfs(ctx context.Context, agnhost, source string) (rootfs, error) {
	r := rootfs{}
	var missing []string
	for _, t := range hostTools {
		if _, err := os.Stat(t.src); err != nil {
			missing = append(missing, t.pkg)
		}
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("build the agnhost image: %s missing on the host (apt-get install %s)",
			strings.Join(missing, ", "), strings.Join(AptPackages(), " "))
	}
	if err := r.copyHost(agnhost, "/agnhost"); err != nil {
		return nil, err
	}
	r.symlink("/agnhost-2", "agnhost")
	// agnhost porter serves TLS with these when asked to (the proxy tests).
	for _, name := range []string{"localhost.crt", "localhost.key"} {
		data, err := os.ReadFile(filepath.Join(source, "test", "images", "agnhost", "porter", name))
		if err != nil {
			return nil, fmt.Errorf("agnhost porter's %s: %w", name, err)
		}
		r.file("/"+name, data, 0o644)
	}
	for _, t := range hostTools {
		if err := r.copyHost(t.src, t.dst); err != nil {
			return nil, err
		}
		libs, err := sharedLibs(ctx, t.src)
		if err != nil {
			return nil, err
		}
		for _, lib := range libs {
			if _, ok := r[lib]; ok {
				continue
			}
			if err := r.copyHost(lib, lib); err != nil {
				return nil, err
			}
		}
	}
	applets, err := exec.CommandContext(ctx, "/usr/bin/busybox", "--list").Output()
	if err != nil {
		return nil, fmt.Errorf("list busybox applets: %w", err)
	}
	for _, a := range strings.Fields(string(applets)) {
		if a == "busybox" || strings.ContainsRune(a, '/') {
			continue
		}
		// A real tool from the host wins over busybox's applet.
		if _, ok := r["/usr/bin/"+a]; ok {
			continue
		}
		if _, ok := r["/bin/"+a]; ok {
			continue
		}
		r.symlink("/bin/"+a, "busybox")
	}
	r.dir("/proc", 0o555)
	r.dir("/tmp", os.ModeSticky|0o777)
	r.dir("/uploads", 0o755)
	r.dir("/var/run", 0o755)
	r.file("/etc/passwd", []byte("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"+
		"user-defined-in-image:x:1000:1000::/home/user-defined-in-image:/bin/sh\n"), 0o644)
	r.file("/etc/group", []byte("root:x:0:\nnogroup:x:65534:\nuser-defined-in-image:x:1000:\n"+
		"group-defined-in-image:x:50000:user-defined-in-image\n"), 0o644)
	r.file("/etc/nsswitch.conf", []byte("hosts: files dns\n"), 0o644)
	return r, nil
}

// epoch keeps the images reproducible.
var epoch = time.Unix(0, 0).UTC()

// layer packs r as one image layer, parents before children.
func (r rootfs) layer() (v1.Layer, error) {
	paths := make([]string, 0, len(r))
	for p := range r {
		paths = append(paths, p)
	}
	slices.Sort(paths)
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, p := range paths {
		e := r[p]
		h := &tar.Header{Name: strings.TrimPrefix(p, "/"), Mode: int64(e.mode.Perm()), ModTime: epoch, Format: tar.FormatPAX}
		if e.mode&os.ModeSticky != 0 {
			h.Mode |= 0o1000
		}
		switch {
		case e.mode.IsDir():
			h.Typeflag, h.Name = tar.TypeDir, h.Name+"/"
		case e.mode&os.ModeSymlink != 0:
			h.Typeflag, h.Linkname = tar.TypeSymlink, e.linkname
		default:
			h.Typeflag, h.Size = tar.TypeReg, int64(len(e.data))
		}
		if err := tw.WriteHeader(h); err != nil {
			return nil, fmt.Errorf("write layer: %w", err)
		}
		if _, err := tw.Write(e.data); err != nil {
			return nil, fmt.Errorf("write layer: %w", err)
		}
	}
	if err := tw.Close(); err != nil {
		return nil, fmt.Errorf("write layer: %w", err)
	}
	data := buf.Bytes()
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(data)), nil
	}, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		return nil, fmt.Errorf("create layer: %w", err)
	}
	return layer, nil
}

// writeTree lays r out below dir, as a container's root would be.
func (r rootfs) writeTree(dir string) error {
	paths := make([]string, 0, len(r))
	for p := range r {
		paths = append(paths, p)
	}
	slices.Sort(paths)
	for _, p := range paths {
		e, dst := r[p], filepath.Join(dir, p)
		var err error
		switch {
		case e.mode.IsDir():
			if err = os.MkdirAll(dst, 0o755); err == nil {
				err = os.Chmod(dst, e.mode.Perm()|e.mode&os.ModeSticky)
			}
		case e.mode&os.ModeSymlink != 0:
			err = os.Symlink(e.linkname, dst)
		default:
			err = os.WriteFile(dst, e.data, e.mode.Perm())
		}
		if err != nil {
			return fmt.Errorf("lay out %s: %w", p, err)
		}
	}
	return nil
}

// image is layer as an image that runs entrypoint with cmd.
func image(layer v1.Layer, entrypoint, cmd []string) (v1.Image, error) {
	img := mutate.ConfigMediaType(mutate.MediaType(empty.Image, types.OCIManifestSchema1), types.OCIConfigJSON)
	img, err := mutate.AppendLayers(img, layer)
	if err != nil {
		return nil, fmt.Errorf("append layer: %w", err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("read image config: %w", err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", runtime.GOARCH
	cf.Created = v1.Time{Time: epoch}
	cf.Config.Entrypoint = entrypoint
	cf.Config.Cmd = cmd
	cf.Config.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
	return mutate.ConfigFile(img, cf)
}

// imageKind is what the lab runs for an image the e2e tests name.
type imageKind int

const (
	kindNone     imageKind = iota
	kindAgnhost            // agnhost: entrypoint /agnhost, cmd pause
	kindBusyBox            // the same tree, cmd sh
	kindGlibcDNS           // the DNS tests' glibc querier: the same tree (Debian's glibc), cmd sh
	kindPause              // the lab's pause binary
)

// kindOf tells, from the repository's last path element, which image the
// lab builds for an image the e2e tests name; kindNone for the images it
// has no stand-in for.
func kindOf(ref string) imageKind {
	repo := ref
	if i := strings.LastIndex(repo, ":"); i > strings.LastIndex(repo, "/") {
		repo = repo[:i]
	}
	switch path.Base(repo) {
	case "agnhost":
		return kindAgnhost
	case "busybox":
		return kindBusyBox
	case "glibc-dns-testing":
		return kindGlibcDNS
	case "pause":
		return kindPause
	}
	return kindNone
}

// standIns returns, for each of refs, the image the lab builds for it. The
// test images live in one repository (busybox's); an agnhost elsewhere is
// one the tests expect to be unpullable (a private registry's), so it gets
// no stand-in.
func standIns(refs []string) []imageKind {
	testRepo := ""
	for _, ref := range refs {
		if kindOf(ref) == kindBusyBox {
			testRepo = path.Dir(ref)
		}
	}
	kinds := make([]imageKind, len(refs))
	for i, ref := range refs {
		kinds[i] = kindOf(ref)
		if testRepo != "" && kinds[i] != kindPause && kinds[i] != kindNone && path.Dir(ref) != testRepo {
			kinds[i] = kindNone
		}
	}
	return kinds
}

// ListImages returns the images the e2e binary's tests run, as its
// --list-images prints them: the names its pods use, which the lab must
// hold under exactly those names since it has no registry.
func ListImages(ctx context.Context, e2eTest string) ([]string, error) {
	out, err := exec.CommandContext(ctx, e2eTest, "--list-images").Output()
	if err != nil {
		return nil, fmt.Errorf("%s --list-images: %w%s", e2eTest, err, stderrOf(err))
	}
	var refs []string
	for _, l := range strings.Split(string(out), "\n") {
		if l = strings.TrimSpace(l); l != "" && !strings.ContainsAny(l, " \t") {
			refs = append(refs, l)
		}
	}
	if len(refs) == 0 {
		return nil, fmt.Errorf("%s --list-images printed no image", e2eTest)
	}
	return refs, nil
}

func stderrOf(err error) string {
	if ee, ok := err.(*exec.ExitError); ok && len(ee.Stderr) > 0 {
		return ": " + strings.TrimSpace(string(ee.Stderr))
	}
	return ""
}

// BuildImages writes into dir one OCI image tarball per image of refs the
// lab can stand in for (agnhost, busybox, glibc-dns-testing, pause), tagged with the name the
// tests use, and returns their paths and the names it has no stand-in for.
// agnhost is the binary to pack, source the k8s.io/kubernetes module's
// dir, pause the lab's pause binary.
func BuildImages(ctx context.Context, dir, agnhost, source, pause string, refs []string) (paths, unsupported []string, err error) {
	tree, err := agnhostRootfs(ctx, agnhost, source)
	if err != nil {
		return nil, nil, err
	}
	treeLayer, err := tree.layer()
	if err != nil {
		return nil, nil, err
	}
	pauseData, err := os.ReadFile(pause)
	if err != nil {
		return nil, nil, fmt.Errorf("read pause binary: %w", err)
	}
	pauseTree := rootfs{}
	pauseTree.file("/pause", pauseData, 0o755)
	pauseLayer, err := pauseTree.layer()
	if err != nil {
		return nil, nil, err
	}
	kinds := standIns(refs)
	for i, ref := range refs {
		var img v1.Image
		kind := kinds[i]
		switch kind {
		case kindAgnhost:
			img, err = image(treeLayer, []string{"/agnhost"}, []string{"pause"})
		case kindBusyBox, kindGlibcDNS:
			img, err = image(treeLayer, nil, []string{"sh"})
		case kindPause:
			img, err = image(pauseLayer, []string{"/pause"}, nil)
		default:
			unsupported = append(unsupported, ref)
			continue
		}
		if err != nil {
			return nil, nil, fmt.Errorf("image %s: %w", ref, err)
		}
		p := filepath.Join(dir, fmt.Sprintf("e2e-image-%02d.tar", i))
		if err := ociimage.WriteOCITar(p, ref, img); err != nil {
			return nil, nil, fmt.Errorf("image %s: %w", ref, err)
		}
		paths = append(paths, p)
	}
	return paths, unsupported, nil
}
