// Package cli is meshctl's command tree: one file per subcommand, each with
// a constructor returning a *cobra.Command.
//
// Main runs the tree and turns its outcome into an exit code that scripts
// can rely on:
//
//	0  success (for `policy trace`, whatever the verdict, unless --exit-code)
//	1  the check failed: `policy validate` found errors, or `policy trace
//	   --exit-code` found the flow DENIED
//	2  usage or input error: bad flags or arguments, unreadable files,
//	   manifests that do not load or validate (for trace and matrix), a
//	   pod or flow the agent does not know
//	3  the agent could not be reached or did not answer: not running,
//	   socket permissions, timeout, an API version this meshctl does not
//	   speak; or the API server could not be reached or refused meshctl
//	   (also RBAC that forbids reaching another node's agent)
package cli

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/spf13/cobra"
)

// Exit codes of meshctl.
const (
	ExitOK      = 0
	ExitFailure = 1
	ExitUsage   = 2
	// ExitUnreachable: the agent could not be reached or did not answer.
	ExitUnreachable = 3
)

const exitCodesHelp = `Exit codes:
  0  success
  1  the check failed (validation errors; DENIED with trace --exit-code)
  2  usage or input error (bad flags, unreadable or invalid manifests,
     a pod the agent does not know)
  3  the agent could not be reached or did not answer (not running, socket
     permissions, timeout, incompatible API version), or the API server
     could not be reached or refused meshctl (RBAC)`

// Streams are the standard streams of a command run; tests pass buffers.
type Streams struct {
	In       io.Reader
	Out, Err io.Writer
}

// exitError carries an exit code out of a RunE. A nil err means the command
// has already said everything it had to.
type exitError struct {
	code int
	err  error
	// showUsage points the user at --help: the command line was wrong, not
	// the input.
	showUsage bool
}

func (e *exitError) Error() string {
	if e.err == nil {
		return fmt.Sprintf("exit status %d", e.code)
	}
	return e.err.Error()
}

func (e *exitError) Unwrap() error { return e.err }

// usageError marks err as a usage or input error (exit 2).
func usageError(err error) error { return &exitError{code: ExitUsage, err: err} }

// usageErrorf is usageError with formatting.
func usageErrorf(format string, args ...any) error {
	return usageError(fmt.Errorf(format, args...))
}

// failed ends a command with exit code 1 after it has printed its findings.
func failed() error { return &exitError{code: ExitFailure} }

// NewRootCommand returns the meshctl command tree writing to s.
func NewRootCommand(s Streams) *cobra.Command {
	return newRootCommand(s, processEnv(), connectKubeconfig)
}

// newRootCommand builds the tree; kube makes the API server clients
// (tests pass fake ones).
func newRootCommand(s Streams, env agentEnv, kube kubeConnect) *cobra.Command {
	root := &cobra.Command{
		Use:   "meshctl",
		Short: "Inspect and explain the Veil mesh",
		Long: `meshctl inspects the Veil mesh: it explains what policy allows, before
the policy is applied (offline, from manifest files), and shows a node's
live state through its agent: health, endpoints, identities, compiled
policy, traces and flows. From the API server it shows and audits the
whole cluster's transparent encryption.

` + exitCodesHelp,
		SilenceErrors: true,
		SilenceUsage:  true,
		// Without subcommand meshctl only prints help, which is not an error.
		RunE: func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
	}
	root.SetIn(s.In)
	root.SetOut(s.Out)
	root.SetErr(s.Err)
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error {
		return &exitError{code: ExitUsage, err: err, showUsage: true}
	})
	cluster := newKubeOptions(env, kube)
	cluster.addFlags(root)
	agent := newAgentOptions(root, env, cluster)
	root.AddCommand(newVersionCommand(), newPolicyCommand(agent), newStatusCommand(agent),
		newEndpointsCommand(agent), newServicesCommand(agent), newIdentitiesCommand(agent), newObserveCommand(agent),
		newEncryptionCommand(agent, cluster), newAuditCommand(agent, cluster), newLabCommand(env))
	return root
}

// Main runs meshctl with args and returns the exit code.
func Main(args []string, s Streams) int {
	return mainWith(context.Background(), args, s, processEnv())
}

func mainWith(ctx context.Context, args []string, s Streams, env agentEnv) int {
	return execute(ctx, newRootCommand(s, env, connectKubeconfig), args, s)
}

// execute runs root with args and turns its outcome into an exit code.
func execute(ctx context.Context, root *cobra.Command, args []string, s Streams) int {
	// Cobra reads os.Args when given nil; args is the whole command line.
	if args == nil {
		args = []string{}
	}
	root.SetArgs(args)
	err := root.ExecuteContext(ctx)
	if err == nil {
		return ExitOK
	}
	var ee *exitError
	if !errors.As(err, &ee) {
		// Cobra's own errors: unknown command, wrong number of arguments.
		ee = &exitError{code: ExitUsage, err: err, showUsage: true}
	}
	if ee.err != nil {
		fmt.Fprintf(s.Err, "meshctl: %v\n", ee.err)
		if ee.showUsage {
			fmt.Fprintln(s.Err, "Run 'meshctl --help' for usage.")
		}
	}
	return ee.code
}
