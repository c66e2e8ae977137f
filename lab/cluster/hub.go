package cluster

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"k8s.io/client-go/rest"

	"github.com/veilmesh/veil/lab/controlplane"
)

// hubDial dials addr from inside the hub's network namespace.
func (c *Cluster) hubDial(ctx context.Context, network, addr string) (net.Conn, error) {
	var conn net.Conn
	err := c.hub.Do(func() (err error) {
		var d net.Dialer
		conn, err = d.DialContext(ctx, network, addr)
		return err
	})
	return conn, err
}

// hubHTTPGet fetches url inside the hub and fails unless it answers 200.
// The components' self-signed serving certificates are not checked: this
// only asks whether a server is up.
func (c *Cluster) hubHTTPGet(ctx context.Context, url string) error {
	client := &http.Client{
		Timeout: 2 * time.Second,
		Transport: &http.Transport{
			DialContext:     c.hubDial,
			TLSClientConfig: &tls.Config{InsecureSkipVerify: true},
		},
	}
	defer client.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, resp.Body)
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return nil
}

// startRelay exposes the API server on a free port of the host's loopback,
// for the caller's clients: the host has no route into the lab.
func (c *Cluster) startRelay() error {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fmt.Errorf("listen for the API server relay: %w", err)
	}
	c.relay = ln
	target := net.JoinHostPort(HubIP.String(), strconv.Itoa(apiPort))
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer conn.Close()
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				up, err := c.hubDial(ctx, "tcp", target)
				cancel()
				if err != nil {
					return
				}
				defer up.Close()
				done := make(chan struct{})
				go func() {
					io.Copy(up, conn)
					up.(*net.TCPConn).CloseWrite()
					close(done)
				}()
				io.Copy(conn, up)
				<-done
			}()
		}
	}()
	cfg, err := c.clientConfig("veil-lab-admin", "system:masters")
	if err != nil {
		return err
	}
	cfg.Host = "https://" + ln.Addr().String()
	c.Config = cfg
	c.Kubeconfig = filepath.Join(c.Dir, "kubeconfig")
	return controlplane.WriteKubeconfig(c.Kubeconfig, cfg)
}

// clientConfig is a config that authenticates as user in groups with a
// certificate of the cluster's CA, for the API server on the hub.
func (c *Cluster) clientConfig(user string, groups ...string) (*rest.Config, error) {
	cert, key, err := c.ca.Client(user, groups...)
	if err != nil {
		return nil, err
	}
	return &rest.Config{
		Host: "https://" + net.JoinHostPort(HubIP.String(), strconv.Itoa(apiPort)),
		TLSClientConfig: rest.TLSClientConfig{
			CAData:   c.ca.CertPEM(),
			CertData: cert,
			KeyData:  key,
		},
		QPS:   100,
		Burst: 200,
	}, nil
}

// UserConfig returns a client config for user in groups, through the relay,
// for tests of RBAC rules.
func (c *Cluster) UserConfig(user string, groups ...string) (*rest.Config, error) {
	cfg, err := c.clientConfig(user, groups...)
	if err != nil {
		return nil, err
	}
	cfg.Host = c.Config.Host
	return cfg, nil
}

// writePKI creates the cluster's CA and every certificate, key and
// kubeconfig of the hub's components and of nodes 1…n under Dir/pki.
func (c *Cluster) writePKI(n int) error {
	ca, err := controlplane.NewCA("veil-lab-" + c.Prefix)
	if err != nil {
		return err
	}
	c.ca = ca
	files := map[string][]byte{"ca.crt": ca.CertPEM()}
	svc := ServiceCIDR.Addr().As4()
	svc[3] = 1 // the kubernetes Service's cluster IP
	crt, key, err := ca.Serving("kube-apiserver",
		[]string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"},
		[]net.IP{net.IPv4(127, 0, 0, 1), HubIP.AsSlice(), netip.AddrFrom4(svc).AsSlice()})
	if err != nil {
		return err
	}
	files["apiserver.crt"], files["apiserver.key"] = crt, key
	if files["sa.key"], files["sa.pub"], err = controlplane.ServiceAccountKeys(); err != nil {
		return err
	}
	// The API server calls kubelets as a member of system:masters.
	if files["apiserver-kubelet-client.crt"], files["apiserver-kubelet-client.key"], err = ca.Client("kube-apiserver-kubelet-client", "system:masters"); err != nil {
		return err
	}
	kubeconfigs := map[string][]string{
		"kube-controller-manager.kubeconfig": {"system:kube-controller-manager"},
		"kube-scheduler.kubeconfig":          {"system:kube-scheduler"},
		"kube-proxy.kubeconfig":              {"system:kube-proxy"},
	}
	if err := c.writeFiles(files, kubeconfigs); err != nil {
		return err
	}
	for i := 1; i <= n; i++ {
		if err := c.writeNodePKI(i); err != nil {
			return err
		}
	}
	return nil
}

// writeNodePKI writes node i's kubelet certificates and kubeconfig under
// Dir/pki, from the cluster's CA.
func (c *Cluster) writeNodePKI(i int) error {
	// kubelet's serving certificate, checked by the API server.
	crt, key, err := c.ca.Serving(NodeName(i), []string{NodeName(i)}, []net.IP{NodeIP(i).AsSlice()})
	if err != nil {
		return err
	}
	return c.writeFiles(
		map[string][]byte{NodeName(i) + "-kubelet.crt": crt, NodeName(i) + "-kubelet.key": key},
		map[string][]string{NodeName(i) + "-kubelet.kubeconfig": {"system:node:" + NodeName(i), "system:nodes"}})
}

// writeFiles writes files, and a kubeconfig for each identity (user,
// groups...) of kubeconfigs, under Dir/pki.
func (c *Cluster) writeFiles(files map[string][]byte, kubeconfigs map[string][]string) error {
	dir := filepath.Join(c.Dir, "pki")
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			return fmt.Errorf("write %s: %w", name, err)
		}
	}
	for name, id := range kubeconfigs {
		cfg, err := c.clientConfig(id[0], id[1:]...)
		if err != nil {
			return err
		}
		if err := controlplane.WriteKubeconfig(filepath.Join(dir, name), cfg); err != nil {
			return err
		}
	}
	return nil
}

// mountsBelow returns the host's mount points at or below dir, deepest
// first.
func mountsBelow(dir string) ([]string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("read mountinfo: %w", err)
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		mp := unescapeMount(fields[4])
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			out = append(out, mp)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read mountinfo: %w", err)
	}
	slices.SortFunc(out, func(a, b string) int { return len(b) - len(a) })
	return out, nil
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// unmountBelow detaches every mount at or below dir, deepest first.
func unmountBelow(dir string) error {
	mounts, err := mountsBelow(dir)
	if err != nil {
		return err
	}
	var errs []error
	for _, mp := range mounts {
		if err := syscall.Unmount(mp, syscall.MNT_DETACH); err != nil && !errors.Is(err, syscall.EINVAL) {
			errs = append(errs, fmt.Errorf("unmount %s: %w", mp, err))
		}
	}
	return errors.Join(errs...)
}
