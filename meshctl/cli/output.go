package cli

import (
	"io"

	"github.com/spf13/cobra"

	"github.com/veilmesh/veil/meshctl/output"
)

// outputFlag is the -o flag that every command with machine-readable output
// has.
type outputFlag struct{ format string }

func addOutputFlag(cmd *cobra.Command, o *outputFlag) {
	cmd.Flags().StringVarP(&o.format, "output", "o", output.Table, "output format: table, json or yaml")
}

func (o *outputFlag) check() error {
	if err := output.Check(o.format); err != nil {
		return usageError(err)
	}
	return nil
}

// structured writes v as indented JSON or YAML; it reports false for table
// output, which each command renders itself.
func (o *outputFlag) structured(w io.Writer, v any) (bool, error) {
	return output.Structured(w, o.format, v)
}

// structuredCompact is structured with JSON on one line, for outputs whose
// exact form is a contract and that can be large.
func (o *outputFlag) structuredCompact(w io.Writer, v any) (bool, error) {
	return output.StructuredCompact(w, o.format, v)
}
