package cli

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/veilmesh/veil/api/client/clientset/versioned"
	meshv1alpha1 "github.com/veilmesh/veil/api/mesh/v1alpha1"
	"github.com/veilmesh/veil/meshctl/agentclient"
	"github.com/veilmesh/veil/meshctl/audit"
)

// envKubeconfig lists kubeconfig files, as for kubectl.
const envKubeconfig = "KUBECONFIG"

// kubeClients are the API server clients of the commands that read the
// cluster: the encryption state lives in MeshNodes, next to Nodes and Pods.
type kubeClients struct {
	core kubernetes.Interface
	mesh versioned.Interface
	// server is the API server's address, for reports.
	server string
	// exec runs a command in a pod, as kubectl exec does: it reaches
	// other nodes' agents.
	exec agentclient.Exec
}

// kubeConnect makes the clients from the --kubeconfig and --context flags.
// meshctl's is connectKubeconfig; tests connect to fake clientsets.
type kubeConnect func(kubeconfig, context string, env agentEnv) (*kubeClients, error)

// kubeOptions are the flags that say which cluster to read, shared by the
// commands that read one.
type kubeOptions struct {
	env        agentEnv
	connectFn  kubeConnect
	kubeconfig string
	context    string
}

func newKubeOptions(env agentEnv, connect kubeConnect) *kubeOptions {
	return &kubeOptions{env: env, connectFn: connect}
}

// addFlags adds the cluster flags to cmd and its subcommands.
func (o *kubeOptions) addFlags(cmd *cobra.Command) {
	fs := cmd.PersistentFlags()
	fs.StringVar(&o.kubeconfig, "kubeconfig", "", "the kubeconfig file to reach the API server with (env "+envKubeconfig+", else ~/.kube/config)")
	fs.StringVar(&o.context, "context", "", "the kubeconfig context to use (default: its current context)")
}

// connect makes the clients; its errors carry meshctl's exit codes.
func (o *kubeOptions) connect() (*kubeClients, error) {
	return o.connectFn(o.kubeconfig, o.context, o.env)
}

// connectKubeconfig loads the kubeconfig as kubectl does (--kubeconfig,
// else every file of $KUBECONFIG, else ~/.kube/config) and, when there is
// none but meshctl runs in a pod, uses the pod's service account.
func connectKubeconfig(kubeconfig, kubeContext string, env agentEnv) (*kubeClients, error) {
	cfg, err := loadKubeconfig(kubeconfig, kubeContext, env)
	if err != nil {
		return nil, err
	}
	cfg.UserAgent = "meshctl/" + buildVersion().Version
	core, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, usageErrorf("create Kubernetes client for %s: %w", cfg.Host, err)
	}
	mesh, err := versioned.NewForConfig(cfg)
	if err != nil {
		return nil, usageErrorf("create Veil client for %s: %w", cfg.Host, err)
	}
	exec, err := agentclient.RemoteExec(cfg)
	if err != nil {
		return nil, usageErrorf("create exec client for %s: %w", cfg.Host, err)
	}
	return &kubeClients{core: core, mesh: mesh, server: cfg.Host, exec: exec}, nil
}

func loadKubeconfig(kubeconfig, kubeContext string, env agentEnv) (*rest.Config, error) {
	rules := &clientcmd.ClientConfigLoadingRules{}
	var source string
	switch list := env.getenv(envKubeconfig); {
	case kubeconfig != "":
		rules.ExplicitPath = kubeconfig
		source = "--kubeconfig " + kubeconfig
	case list != "":
		rules.Precedence = filepath.SplitList(list)
		source = envKubeconfig + "=" + list
		if !slices.ContainsFunc(rules.Precedence, fileExists) {
			return nil, usageErrorf("no kubeconfig: none of the files in %s exists", source)
		}
	default:
		var path string
		if home := env.getenv("HOME"); home != "" {
			path = filepath.Join(home, clientcmd.RecommendedHomeDir, clientcmd.RecommendedFileName)
		}
		if path == "" || !fileExists(path) {
			if env.getenv("KUBERNETES_SERVICE_HOST") != "" {
				cfg, err := rest.InClusterConfig()
				if err != nil {
					return nil, usageErrorf("load in-cluster config: %w", err)
				}
				return cfg, nil
			}
			where := "~/.kube/config does not exist"
			if path != "" {
				where = path + " does not exist"
			}
			return nil, usageErrorf("no kubeconfig: --kubeconfig is not given, %s is not set and %s; "+
				"meshctl reads the cluster's state and reaches other nodes' agents through the API server, so point --kubeconfig at the cluster's kubeconfig", envKubeconfig, where)
		}
		rules.Precedence = []string{path}
		source = path
	}
	overrides := &clientcmd.ConfigOverrides{CurrentContext: kubeContext}
	cfg, err := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, overrides).ClientConfig()
	if err != nil {
		return nil, usageErrorf("load kubeconfig (%s): %w", source, err)
	}
	return cfg, nil
}

func fileExists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// apiError turns an API server error into one with meshctl's exit code:
// the API server could not be reached, refused meshctl, or lacks Veil's
// resources (exit 3).
func apiError(op, server string, err error) error {
	var hint string
	switch {
	case apierrors.IsUnauthorized(err):
		hint = "the API server does not accept meshctl's credentials: check the kubeconfig's user"
	case apierrors.IsForbidden(err):
		hint = "RBAC: meshctl needs get and list on nodes, pods and meshnodes.mesh.veil.dev: ask for the " + agentclient.MeshctlRole + " role"
	case apierrors.IsNotFound(err):
		hint = "is the MeshNode CRD installed (deploy/crds)?"
	case errors.Is(err, context.DeadlineExceeded), apierrors.IsTimeout(err), apierrors.IsServerTimeout(err):
		hint = "the API server did not answer within --timeout"
	default:
		hint = "is the API server reachable from here?"
	}
	return &exitError{code: ExitUnreachable, err: fmt.Errorf("%s at %s: %w\n  %s", op, server, err, hint)}
}

// readCluster lists Nodes and MeshNodes, each call bounded by timeout.
func readCluster(ctx context.Context, kc *kubeClients, timeout timeoutFunc) (*audit.Cluster, error) {
	st := &audit.Cluster{Server: kc.server, MeshNodes: map[string]*meshv1alpha1.MeshNode{}}
	// Both lists are read in pages, each bounded by timeout: at thousands
	// of nodes the MeshNodes (each listing every peer) are hundreds of
	// megabytes, more than one response the API server sends in time.
	opts := metav1.ListOptions{Limit: nodePage}
	for {
		nctx, cancel := timeout(ctx)
		nodes, err := kc.core.CoreV1().Nodes().List(nctx, opts)
		cancel()
		if err != nil {
			return nil, apiError("list nodes", kc.server, err)
		}
		st.Nodes = append(st.Nodes, nodes.Items...)
		if opts.Continue = nodes.Continue; opts.Continue == "" {
			break
		}
	}
	slices.SortFunc(st.Nodes, func(a, b corev1.Node) int { return strings.Compare(a.Name, b.Name) })
	opts = metav1.ListOptions{Limit: meshNodePage}
	for {
		mctx, cancel := timeout(ctx)
		mns, err := kc.mesh.MeshV1alpha1().MeshNodes().List(mctx, opts)
		cancel()
		if err != nil {
			return nil, apiError("list meshnodes.mesh.veil.dev", kc.server, err)
		}
		for i := range mns.Items {
			st.MeshNodes[mns.Items[i].Name] = &mns.Items[i]
		}
		if opts.Continue = mns.Continue; opts.Continue == "" {
			break
		}
	}
	return st, nil
}

// Page sizes of readCluster: a MeshNode lists every peer (up to about a
// megabyte at 5,000 nodes), a Node is a few kilobytes.
const (
	nodePage     = 500
	meshNodePage = 250
)

// nodePods lists the pods scheduled on node, each call bounded by timeout.
func nodePods(ctx context.Context, kc *kubeClients, timeout timeoutFunc, node string) ([]corev1.Pod, error) {
	ctx, cancel := timeout(ctx)
	defer cancel()
	pods, err := kc.core.CoreV1().Pods(metav1.NamespaceAll).List(ctx, metav1.ListOptions{FieldSelector: "spec.nodeName=" + node})
	if err != nil {
		return nil, apiError("list pods on node "+node, kc.server, err)
	}
	var out []corev1.Pod
	// The selector is applied again: not every client (a fake one) honours it.
	for _, p := range pods.Items {
		if p.Spec.NodeName == node {
			out = append(out, p)
		}
	}
	slices.SortFunc(out, func(a, b corev1.Pod) int {
		return strings.Compare(a.Namespace+"/"+a.Name, b.Namespace+"/"+b.Name)
	})
	return out, nil
}

// timeoutFunc bounds one API call.
type timeoutFunc func(context.Context) (context.Context, context.CancelFunc)

func withTimeout(d time.Duration) timeoutFunc {
	return func(ctx context.Context) (context.Context, context.CancelFunc) {
		return context.WithTimeout(ctx, d)
	}
}
