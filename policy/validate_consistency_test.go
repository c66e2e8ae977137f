package policy

import (
	"math/rand/v2"
	"testing"
)

// The compiler must never skip a policy the API server (or the CRD's
// validation, as ValidateNetworkPolicy and friends implement it) accepts:
// that would silently drop rules that are in force in the cluster.
func TestCompilerAcceptsWhatValidationAccepts(t *testing.T) {
	for seed := range 200 {
		g := gen{rand.New(rand.NewPCG(uint64(seed), 13))}
		in := g.input()
		c := mustCompileAllowInvalid(t, in)
		for _, p := range in.NetworkPolicies {
			if errs := ValidateNetworkPolicy(p); len(errs) == 0 && c.PolicyError(PolicyRef{KindNetworkPolicy, p.Namespace, p.Name}) != nil {
				t.Errorf("seed %d: %s/%s valid but skipped: %v", seed, p.Namespace, p.Name, c.PolicyError(PolicyRef{KindNetworkPolicy, p.Namespace, p.Name}))
			}
		}
		for _, p := range in.MeshPolicies {
			if errs := ValidateMeshPolicy(p); len(errs) == 0 && c.PolicyError(PolicyRef{KindMeshPolicy, p.Namespace, p.Name}) != nil {
				t.Errorf("seed %d: %s/%s valid but skipped: %v", seed, p.Namespace, p.Name, c.PolicyError(PolicyRef{KindMeshPolicy, p.Namespace, p.Name}))
			}
		}
		for _, p := range in.ClusterMeshPolicies {
			if errs := ValidateClusterMeshPolicy(p); len(errs) == 0 && c.PolicyError(PolicyRef{Kind: KindClusterMeshPolicy, Name: p.Name}) != nil {
				t.Errorf("seed %d: %s valid but skipped: %v", seed, p.Name, c.PolicyError(PolicyRef{Kind: KindClusterMeshPolicy, Name: p.Name}))
			}
		}
	}
}

func mustCompileAllowInvalid(t *testing.T, in Input) *Compiler {
	t.Helper()
	c, err := Compile(in, Options{})
	if err != nil {
		t.Fatal(err)
	}
	return c
}
