package controlplane

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/veilmesh/veil/lab/netns"
)

// Options tune Start. The zero value starts a control plane with Veil's
// CRDs, building the binaries if the cache lacks them.
type Options struct {
	// Binaries to run; zero means Build.
	Binaries Binaries
	// TempDir is where Start creates its working dir (certificates, etcd
	// data, logs); empty means os.TempDir(). Stop removes the working dir.
	TempDir string
	// CRDDir holds the CRD manifests to install; empty means the
	// checkout's deploy/crds.
	CRDDir string
	// SkipCRDs starts the control plane without installing any CRD.
	SkipCRDs bool
	// Timeout bounds starting both servers and installing the CRDs, not
	// the build; zero means 2 minutes.
	Timeout time.Duration
}

// ServiceClusterIPRange is the Service CIDR of the control plane.
const ServiceClusterIPRange = "10.96.0.0/16"

// ControlPlane is a running etcd and kube-apiserver on loopback.
//
// The API server authenticates client certificates signed by the control
// plane's CA and authorizes with Node and RBAC, as a production cluster
// does. No controller manager runs: nothing creates service accounts (the
// ServiceAccount admission plugin is off, so pods need none; TokenRequest
// works for accounts a test creates), the aggregated ClusterRoles view, edit
// and admin stay empty, and nothing garbage-collects or schedules.
type ControlPlane struct {
	// Config is a cluster-admin (system:masters) client config.
	Config *rest.Config
	// Kubeconfig is the path of a kubeconfig file for Config.
	Kubeconfig string
	// Dir is the working dir: certificates, etcd data and the servers' logs
	// (etcd.log, kube-apiserver.log). Stop removes it.
	Dir string
	// EtcdURL is etcd's client URL (plain HTTP on loopback).
	EtcdURL string
	// Server is the API server's URL.
	Server string

	ca    *authority
	procs []*process

	stopOnce sync.Once
	stopErr  error
}

// Start starts etcd and kube-apiserver on free loopback ports, waits until
// the API server is ready, installs the CRDs and waits until they are
// Established. On error, everything Start started is stopped. The caller
// must call Stop.
func Start(ctx context.Context, opts Options) (*ControlPlane, error) {
	if opts.Binaries == (Binaries{}) {
		bins, err := Build(ctx)
		if err != nil {
			return nil, err
		}
		opts.Binaries = bins
	}
	if opts.CRDDir == "" && !opts.SkipCRDs {
		root, err := repoRoot()
		if err != nil {
			return nil, err
		}
		opts.CRDDir = filepath.Join(root, "deploy", "crds")
	}
	timeout := opts.Timeout
	if timeout == 0 {
		timeout = 2 * time.Minute
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()

	dir, err := os.MkdirTemp(opts.TempDir, "veil-controlplane-")
	if err != nil {
		return nil, fmt.Errorf("create control-plane dir: %w", err)
	}
	cp := &ControlPlane{Dir: dir}
	if err := cp.start(ctx, opts); err != nil {
		if stopErr := cp.Stop(); stopErr != nil {
			err = errors.Join(err, stopErr)
		}
		return nil, err
	}
	return cp, nil
}

// StartForTest starts a control plane for t and stops it when t ends, with
// the servers' logs in t's output when t failed. It fails t on error.
func StartForTest(t testing.TB, opts Options) *ControlPlane {
	t.Helper()
	if opts.TempDir == "" {
		opts.TempDir = t.TempDir()
	}
	// A first build from source takes minutes; later runs hit the cache.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	cp, err := Start(ctx, opts)
	if err != nil {
		t.Fatalf("start control plane: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			for _, p := range cp.procs {
				t.Logf("last lines of %s:\n%s", p.logPath, p.logTail(8192))
			}
		}
		if err := cp.Stop(); err != nil {
			t.Errorf("stop control plane: %v", err)
		}
	})
	return cp
}

func (cp *ControlPlane) start(ctx context.Context, opts Options) error {
	ports, err := freePorts(3)
	if err != nil {
		return err
	}
	etcdClient, etcdPeer, apiPort := ports[0], ports[1], ports[2]
	cp.EtcdURL = "http://" + net.JoinHostPort("127.0.0.1", strconv.Itoa(etcdClient))
	cp.Server = "https://" + net.JoinHostPort("127.0.0.1", strconv.Itoa(apiPort))

	if err := cp.writePKI(); err != nil {
		return err
	}

	peerURL := "http://" + net.JoinHostPort("127.0.0.1", strconv.Itoa(etcdPeer))
	etcd, err := cp.run(opts.Binaries.Etcd, "etcd",
		"--name=veil-lab",
		"--data-dir="+filepath.Join(cp.Dir, "etcd-data"),
		"--listen-client-urls="+cp.EtcdURL,
		"--advertise-client-urls="+cp.EtcdURL,
		"--listen-peer-urls="+peerURL,
		"--initial-advertise-peer-urls="+peerURL,
		"--initial-cluster=veil-lab="+peerURL,
		// The data is thrown away after the run; fsync only costs time.
		"--unsafe-no-fsync",
		"--log-level=warn",
	)
	if err != nil {
		return err
	}
	if err := waitFor(ctx, etcd, "etcd /health", func(ctx context.Context) error {
		return httpOK(ctx, http.DefaultClient, cp.EtcdURL+"/health")
	}); err != nil {
		return err
	}

	pki := func(name string) string { return filepath.Join(cp.Dir, "pki", name) }
	apiserver, err := cp.run(opts.Binaries.KubeAPIServer, "kube-apiserver",
		"--etcd-servers="+cp.EtcdURL,
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		// The endpoint reconciler refuses a loopback address; the lab's
		// clients use the kubeconfig, not the kubernetes Service.
		"--endpoint-reconciler-type=none",
		"--secure-port="+strconv.Itoa(apiPort),
		"--cert-dir="+filepath.Join(cp.Dir, "pki"),
		"--tls-cert-file="+pki("apiserver.crt"),
		"--tls-private-key-file="+pki("apiserver.key"),
		"--client-ca-file="+pki("ca.crt"),
		"--authorization-mode=Node,RBAC",
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file="+pki("sa.pub"),
		"--service-account-signing-key-file="+pki("sa.key"),
		"--service-cluster-ip-range="+ServiceClusterIPRange,
		"--disable-admission-plugins=ServiceAccount",
		"--allow-privileged=true",
		"--profiling=false",
	)
	if err != nil {
		return err
	}

	admin, err := cp.UserConfig("veil-admin", "system:masters")
	if err != nil {
		return err
	}
	cp.Config = admin
	clients, err := kubernetes.NewForConfig(admin)
	if err != nil {
		return fmt.Errorf("create admin client: %w", err)
	}
	if err := waitFor(ctx, apiserver, "kube-apiserver /readyz", func(ctx context.Context) error {
		_, err := clients.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		return err
	}); err != nil {
		return err
	}
	if err := waitFor(ctx, apiserver, "namespace default", func(ctx context.Context) error {
		_, err := clients.CoreV1().Namespaces().Get(ctx, "default", metav1.GetOptions{})
		return err
	}); err != nil {
		return err
	}

	cp.Kubeconfig = filepath.Join(cp.Dir, "kubeconfig")
	if err := WriteKubeconfig(cp.Kubeconfig, admin); err != nil {
		return err
	}

	if !opts.SkipCRDs {
		if err := InstallCRDs(ctx, admin, opts.CRDDir); err != nil {
			return err
		}
	}
	return nil
}

// writePKI creates the CA, the API server's serving certificate and the
// service-account signing key under Dir/pki.
func (cp *ControlPlane) writePKI() error {
	dir := filepath.Join(cp.Dir, "pki")
	if err := os.Mkdir(dir, 0o700); err != nil {
		return fmt.Errorf("create pki dir: %w", err)
	}
	ca, err := newAuthority("veil-lab-ca")
	if err != nil {
		return err
	}
	cp.ca = ca
	serving, err := ca.serving("kube-apiserver",
		[]string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"},
		[]net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback, net.IPv4(10, 96, 0, 1)})
	if err != nil {
		return err
	}
	saKey, saPub, err := serviceAccountKeys()
	if err != nil {
		return err
	}
	return writeFiles(dir, map[string][]byte{
		"ca.crt":        ca.certPEM,
		"apiserver.crt": serving.certPEM,
		"apiserver.key": serving.keyPEM,
		"sa.key":        saKey,
		"sa.pub":        saPub,
	})
}

// UserConfig returns a client config that authenticates as user in groups
// with a client certificate signed by the control plane's CA, for tests of
// RBAC rules: the user has no permissions beyond what RBAC grants it.
func (cp *ControlPlane) UserConfig(user string, groups ...string) (*rest.Config, error) {
	pair, err := cp.ca.client(user, groups...)
	if err != nil {
		return nil, err
	}
	return &rest.Config{
		Host: cp.Server,
		TLSClientConfig: rest.TLSClientConfig{
			CAData:   cp.ca.certPEM,
			CertData: pair.certPEM,
			KeyData:  pair.keyPEM,
		},
		QPS:   100,
		Burst: 200,
	}, nil
}

// WriteKubeconfig writes a kubeconfig file (mode 0600) for cfg, which must
// authenticate with an embedded client certificate.
func WriteKubeconfig(path string, cfg *rest.Config) error {
	kc := clientcmdapi.NewConfig()
	kc.Clusters["veil-lab"] = &clientcmdapi.Cluster{
		Server:                   cfg.Host,
		CertificateAuthorityData: cfg.CAData,
	}
	kc.AuthInfos["veil-lab"] = &clientcmdapi.AuthInfo{
		ClientCertificateData: cfg.CertData,
		ClientKeyData:         cfg.KeyData,
	}
	kc.Contexts["veil-lab"] = &clientcmdapi.Context{Cluster: "veil-lab", AuthInfo: "veil-lab"}
	kc.CurrentContext = "veil-lab"
	if err := clientcmd.WriteToFile(*kc, path); err != nil {
		return fmt.Errorf("write kubeconfig %s: %w", path, err)
	}
	return nil
}

// Stop terminates the servers Start started (SIGTERM, then SIGKILL after
// 10 s) and removes Dir. It is safe to call more than once.
func (cp *ControlPlane) Stop() error {
	cp.stopOnce.Do(func() {
		var errs []error
		// The API server first, so it does not log etcd going away.
		for i := len(cp.procs) - 1; i >= 0; i-- {
			if err := cp.procs[i].stop(10 * time.Second); err != nil {
				errs = append(errs, err)
			}
		}
		if err := os.RemoveAll(cp.Dir); err != nil {
			errs = append(errs, fmt.Errorf("remove control-plane dir: %w", err))
		}
		cp.stopErr = errors.Join(errs...)
	})
	return cp.stopErr
}

// process is a server Start started.
type process struct {
	name    string
	cmd     *exec.Cmd
	logPath string
	log     *os.File
	done    chan struct{} // closed when the process has exited
	waitErr error         // set before done is closed
}

func (cp *ControlPlane) run(bin, name string, args ...string) (*process, error) {
	logPath := filepath.Join(cp.Dir, name+".log")
	log, err := os.Create(logPath)
	if err != nil {
		return nil, fmt.Errorf("create %s log: %w", name, err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Dir = cp.Dir
	cmd.Stdout = log
	cmd.Stderr = log
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// Its own process group keeps a terminal's ^C for the test, which
		// then stops the servers in order; Pdeathsig kills them if the test
		// binary dies without stopping them.
		Setpgid:   true,
		Pdeathsig: syscall.SIGKILL,
	}
	p := &process{name: name, cmd: cmd, logPath: logPath, log: log, done: make(chan struct{})}
	if err := netns.StartPinned(cmd, func(err error) {
		p.waitErr = err
		log.Close()
		close(p.done)
	}); err != nil {
		log.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	cp.procs = append(cp.procs, p)
	return p, nil
}

func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop signals exactly this process, never its group or anything else.
func (p *process) stop(grace time.Duration) error {
	if p.exited() {
		return nil
	}
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("stop %s (pid %d): %w", p.name, p.cmd.Process.Pid, err)
	}
	select {
	case <-p.done:
		return nil
	case <-time.After(grace):
	}
	if err := p.cmd.Process.Kill(); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("kill %s (pid %d): %w", p.name, p.cmd.Process.Pid, err)
	}
	<-p.done
	return nil
}

func (p *process) logTail(n int) string {
	data, err := os.ReadFile(p.logPath)
	if err != nil {
		return fmt.Sprintf("(read %s: %v)", p.logPath, err)
	}
	return tail(data, n)
}

// waitFor polls check until it succeeds, p exits or ctx ends; the error
// names what was awaited, the last check error and the end of p's log.
func waitFor(ctx context.Context, p *process, what string, check func(context.Context) error) error {
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for {
		attempt, cancel := context.WithTimeout(ctx, 5*time.Second)
		lastErr := check(attempt)
		cancel()
		if lastErr == nil {
			return nil
		}
		select {
		case <-p.done:
			return fmt.Errorf("wait for %s: %s exited (%v); last lines of %s:\n%s",
				what, p.name, p.waitErr, p.logPath, p.logTail(4096))
		case <-ctx.Done():
			return fmt.Errorf("wait for %s: %w (last error: %v); last lines of %s:\n%s",
				what, ctx.Err(), lastErr, p.logPath, p.logTail(4096))
		case <-tick.C:
		}
	}
}

func httpOK(ctx context.Context, client *http.Client, url string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return nil
}

// freePorts returns n distinct loopback TCP ports that were free a moment
// ago; the listeners are held until all are chosen so none repeats.
func freePorts(n int) ([]int, error) {
	ports := make([]int, 0, n)
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("find a free loopback port: %w", err)
		}
		defer l.Close()
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}
