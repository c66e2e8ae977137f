package cli

import (
	"context"
	"fmt"
	"io"
	"slices"
	"strings"

	"github.com/spf13/cobra"
	"k8s.io/apimachinery/pkg/util/validation/field"

	"github.com/veilmesh/veil/meshctl/output"
	"github.com/veilmesh/veil/policy"
	"github.com/veilmesh/veil/policy/manifest"
)

// tracer answers trace questions. Today the only implementation compiles
// manifest files (manifestSource); the agent's gRPC Trace (api/agent/v1),
// which returns a policy.TraceResult from the live compiled state, will be
// the other, so trace depends on this interface and not on where answers
// come from.
type tracer interface {
	Trace(ctx context.Context, from, to policy.Peer, port policy.PortProto) (policy.TraceResult, error)
}

// manifestSource answers from manifest files, with the same compiler the
// agent runs.
type manifestSource struct {
	compiled *policy.Compiler
	// set is what was loaded; traces to a Service resolve it from there.
	set *manifest.Set
}

var _ tracer = (*manifestSource)(nil)

func (m *manifestSource) Trace(_ context.Context, from, to policy.Peer, port policy.PortProto) (policy.TraceResult, error) {
	return m.compiled.Trace(from, to, port.Proto, port.Port)
}

// Matrix is offline only: the agent's API traces single flows.
func (m *manifestSource) Matrix(_ context.Context, ports []policy.PortProto) (policy.Matrix, error) {
	return m.compiled.Matrix(ports), nil
}

// manifestFlags is the -f flag of the commands that read manifests.
type manifestFlags struct {
	paths []string
}

func (f *manifestFlags) add(cmd *cobra.Command) {
	cmd.Flags().StringArrayVarP(&f.paths, "filename", "f", nil,
		"manifest file or directory (recursive: *.yaml, *.yml, *.json), or - for standard input; repeatable")
}

// load reads, checks and compiles the manifests. problems holds every
// finding, sorted by location: the loader's, validation's, lint warnings,
// and any policy the compiler skipped that validation did not flag (so that
// what validate accepts, trace and matrix accept).
func (f *manifestFlags) load(stdin io.Reader) (*manifest.Set, *policy.Compiler, manifest.Problems, error) {
	if len(f.paths) == 0 {
		return nil, nil, nil, usageErrorf("no manifests: give at least one -f FILE|DIR")
	}
	set, err := manifest.Loader{Stdin: stdin}.Load(f.paths...)
	if err != nil {
		return nil, nil, nil, usageError(err)
	}
	problems := checkSet(set)
	c, err := policy.Compile(policy.Input{
		Namespaces:          set.Namespaces,
		Pods:                set.Pods,
		Nodes:               set.Nodes,
		NetworkPolicies:     set.NetworkPolicies,
		MeshPolicies:        set.MeshPolicies,
		ClusterMeshPolicies: set.ClusterMeshPolicies,
	}, policy.Options{})
	if err != nil {
		return nil, nil, nil, fmt.Errorf("compile policies: %w", err)
	}
	flagged := map[string]bool{}
	for _, p := range problems.Errors() {
		flagged[p.Object] = true
	}
	for _, pe := range c.Invalid() {
		ref := manifest.Ref{Kind: string(pe.Policy.Kind), Namespace: pe.Policy.Namespace, Name: pe.Policy.Name}
		if !flagged[ref.String()] {
			problems = append(problems, set.Problem(manifest.SeverityError, ref, pe.Field, "rejected by the compiler: "+pe.Err.Error()))
		}
	}
	slices.SortStableFunc(problems, compareProblems)
	return set, c, problems, nil
}

// openSource loads the manifests for trace and matrix. It refuses input
// with errors, since the API server would have refused it and no verdict
// about it would be true; warnings are summed up on stderr.
func (f *manifestFlags) openSource(stdin io.Reader, stderr io.Writer) (*manifestSource, error) {
	set, c, problems, err := f.load(stdin)
	if err != nil {
		return nil, err
	}
	if errs := problems.Errors(); len(errs) > 0 {
		for _, p := range errs {
			fmt.Fprintln(stderr, p)
		}
		return nil, usageErrorf("the manifests have %s; 'meshctl policy validate' lists every problem", output.Plural(len(errs), "error"))
	}
	if ws := problems.Warnings(); len(ws) > 0 {
		fmt.Fprintf(stderr, "meshctl: the manifests have %s; 'meshctl policy validate' lists them\n", output.Plural(len(ws), "warning"))
	}
	return &manifestSource{compiled: c, set: set}, nil
}

// checkSet validates and lints every object of set, adding the findings to
// the loader's.
func checkSet(set *manifest.Set) manifest.Problems {
	problems := slices.Clone(set.Problems)
	// A field that did not decode is left empty, and validation would then
	// say so again in other words.
	undecoded := map[[2]string]bool{}
	for _, p := range set.Problems.Errors() {
		undecoded[[2]string{p.Object, p.Field}] = true
	}
	add := func(ref manifest.Ref, errs field.ErrorList, ws []policy.Warning) {
		for _, e := range errs {
			if !undecoded[[2]string{ref.String(), e.Field}] {
				problems = append(problems, set.Problem(manifest.SeverityError, ref, e.Field, e.ErrorBody()))
			}
		}
		for _, w := range ws {
			problems = append(problems, set.Problem(manifest.SeverityWarning, ref, w.Field.String(), w.Message))
		}
	}
	inv := policy.NewInventory(set.Namespaces, set.Pods)
	for _, ns := range set.Namespaces {
		if _, explicit := set.Origin(manifest.Ref{Kind: manifest.KindNamespace, Name: ns.Name}); explicit {
			add(manifest.Ref{Kind: manifest.KindNamespace, Name: ns.Name}, policy.ValidateNamespace(ns), nil)
		}
	}
	for _, p := range set.Pods {
		add(manifest.Ref{Kind: manifest.KindPod, Namespace: p.Namespace, Name: p.Name}, policy.ValidatePod(p), policy.LintPod(p))
	}
	for _, np := range set.NetworkPolicies {
		add(manifest.Ref{Kind: manifest.KindNetworkPolicy, Namespace: np.Namespace, Name: np.Name},
			policy.ValidateNetworkPolicy(np), inv.LintNetworkPolicy(np))
	}
	for _, mp := range set.MeshPolicies {
		add(manifest.Ref{Kind: manifest.KindMeshPolicy, Namespace: mp.Namespace, Name: mp.Name},
			policy.ValidateMeshPolicy(mp), inv.LintMeshPolicy(mp))
	}
	for _, cmp := range set.ClusterMeshPolicies {
		add(manifest.Ref{Kind: manifest.KindClusterMeshPolicy, Name: cmp.Name},
			policy.ValidateClusterMeshPolicy(cmp), inv.LintClusterMeshPolicy(cmp))
	}
	slices.SortStableFunc(problems, compareProblems)
	return dedupe(problems)
}

// dedupe drops repeated findings: the loader and validation can both see a
// missing name.
func dedupe(ps manifest.Problems) manifest.Problems {
	return slices.CompactFunc(ps, func(a, b manifest.Problem) bool { return a == b })
}

// compareProblems orders by file, line, then severity (errors first); the
// implicit objects, which have no file, come last.
func compareProblems(a, b manifest.Problem) int {
	if (a.File == "") != (b.File == "") {
		if a.File == "" {
			return 1
		}
		return -1
	}
	if c := strings.Compare(a.File, b.File); c != 0 {
		return c
	}
	if a.Line != b.Line {
		return a.Line - b.Line
	}
	if a.Severity != b.Severity {
		if a.Severity == manifest.SeverityError {
			return -1
		}
		return 1
	}
	return 0
}
