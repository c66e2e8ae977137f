package controlplane

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/veilmesh/veil/tests/testenv"
)

// TestPrivilegedControlPlane checks what tests rely on: the kubeconfig, the
// pinned version, RBAC enforcement, service-account tokens, and a Stop that
// ends exactly the servers it started and removes its files.
func TestPrivilegedControlPlane(t *testing.T) {
	testenv.RequirePrivileged(t)
	if testing.Short() {
		t.Skip("skipped under -short: starts etcd and kube-apiserver, built from source on the first run (several minutes)")
	}
	cp := StartForTest(t, Options{SkipCRDs: true})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	t.Run("kubeconfig-and-version", func(t *testing.T) {
		cfg, err := clientcmd.BuildConfigFromFlags("", cp.Kubeconfig)
		if err != nil {
			t.Fatalf("load kubeconfig: %v", err)
		}
		info, err := kubernetes.NewForConfigOrDie(cfg).Discovery().ServerVersion()
		if err != nil {
			t.Fatalf("server version through the kubeconfig: %v", err)
		}
		src, err := sourceDir()
		if err != nil {
			t.Fatal(err)
		}
		want, err := pinnedVersion(ctx, filepath.Join(src, "kube-apiserver"), "k8s.io/kubernetes")
		if err != nil {
			t.Fatal(err)
		}
		if info.GitVersion != want {
			t.Errorf("server version = %s; want the pinned %s", info.GitVersion, want)
		}
	})

	admin := kubernetes.NewForConfigOrDie(cp.Config)

	t.Run("rbac", func(t *testing.T) {
		cfg, err := cp.UserConfig("mallory", "veil:testers")
		if err != nil {
			t.Fatal(err)
		}
		mallory := kubernetes.NewForConfigOrDie(cfg)
		_, err = mallory.CoreV1().Pods("default").List(ctx, metav1.ListOptions{})
		if !apierrors.IsForbidden(err) {
			t.Fatalf("list pods as a user without bindings: got %v; want Forbidden", err)
		}
		// A Role of its own: the aggregated ClusterRoles (view, edit,
		// admin) stay empty without a controller manager.
		if _, err := admin.RbacV1().Roles("default").Create(ctx, &rbacv1.Role{
			ObjectMeta: metav1.ObjectMeta{Name: "pod-reader"},
			Rules:      []rbacv1.PolicyRule{{APIGroups: []string{""}, Resources: []string{"pods"}, Verbs: []string{"get", "list", "watch"}}},
		}, metav1.CreateOptions{}); err != nil {
			t.Fatalf("create role: %v", err)
		}
		if _, err := admin.RbacV1().RoleBindings("default").Create(ctx, &rbacv1.RoleBinding{
			ObjectMeta: metav1.ObjectMeta{Name: "testers-read-pods"},
			RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "Role", Name: "pod-reader"},
			Subjects:   []rbacv1.Subject{{APIGroup: rbacv1.GroupName, Kind: rbacv1.GroupKind, Name: "veil:testers"}},
		}, metav1.CreateOptions{}); err != nil {
			t.Fatalf("bind pod-reader to veil:testers: %v", err)
		}
		var lastErr error
		if err := wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
			_, err := mallory.CoreV1().Pods("default").List(ctx, metav1.ListOptions{})
			if err != nil && ctx.Err() == nil {
				lastErr = err
			}
			return err == nil, nil
		}); err != nil {
			t.Fatalf("list pods after binding a pod reader role to the user's group: %v", lastErr)
		}
		if _, err := mallory.CoreV1().Pods("kube-system").List(ctx, metav1.ListOptions{}); !apierrors.IsForbidden(err) {
			t.Errorf("list pods in kube-system, where the user has no binding: got %v; want Forbidden", err)
		}
	})

	t.Run("service-account-token", func(t *testing.T) {
		if _, err := admin.CoreV1().ServiceAccounts("default").Create(ctx, &corev1.ServiceAccount{
			ObjectMeta: metav1.ObjectMeta{Name: "veil-agent"},
		}, metav1.CreateOptions{}); err != nil {
			t.Fatalf("create service account: %v", err)
		}
		tr, err := admin.CoreV1().ServiceAccounts("default").CreateToken(ctx, "veil-agent", &authenticationv1.TokenRequest{}, metav1.CreateOptions{})
		if err != nil {
			t.Fatalf("request a token: %v", err)
		}
		cfg := &rest.Config{
			Host:            cp.Server,
			BearerToken:     tr.Status.Token,
			TLSClientConfig: rest.TLSClientConfig{CAData: cp.Config.CAData},
		}
		review, err := kubernetes.NewForConfigOrDie(cfg).AuthenticationV1().SelfSubjectReviews().Create(ctx, &authenticationv1.SelfSubjectReview{}, metav1.CreateOptions{})
		if err != nil {
			t.Fatalf("authenticate with the token: %v", err)
		}
		if got, want := review.Status.UserInfo.Username, "system:serviceaccount:default:veil-agent"; got != want {
			t.Errorf("token authenticates as %q; want %q", got, want)
		}
	})

	t.Run("stop", func(t *testing.T) {
		pids := map[string]int{}
		for _, p := range cp.procs {
			pids[p.name] = p.cmd.Process.Pid
		}
		if len(pids) != 2 {
			t.Fatalf("started processes = %v; want etcd and kube-apiserver", pids)
		}
		if err := cp.Stop(); err != nil {
			t.Fatalf("stop: %v", err)
		}
		for name, pid := range pids {
			if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
				t.Errorf("%s (pid %d) after Stop: kill(0) = %v; want ESRCH", name, pid, err)
			}
		}
		if _, err := os.Stat(cp.Dir); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("control-plane dir after Stop: stat = %v; want it removed", err)
		}
		if err := cp.Stop(); err != nil {
			t.Errorf("second Stop: %v; want nil", err)
		}
	})
}
