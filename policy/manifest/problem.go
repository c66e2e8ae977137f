package manifest

import (
	"fmt"
	"strings"
)

// Severity of a Problem.
type Severity string

const (
	// SeverityError marks input the API server would reject or that cannot
	// be used at all.
	SeverityError Severity = "error"
	// SeverityWarning marks input that is valid but probably not what the
	// author meant.
	SeverityWarning Severity = "warning"
)

// Problem is one finding about the input, located as precisely as the
// input allows: the file, the line (of the field when it can be found, else
// of the document), the document's 1-based index in its file, the object
// and the field path.
type Problem struct {
	Severity Severity `json:"severity"`
	File     string   `json:"file,omitempty"`
	Line     int      `json:"line,omitempty"`
	Document int      `json:"document,omitempty"`
	Object   string   `json:"object,omitempty"`
	Field    string   `json:"field,omitempty"`
	Message  string   `json:"message"`
}

// String renders the problem the way compilers do, so editors can jump to
// it: "file:line: severity: Kind ns/name: field: message".
func (p Problem) String() string {
	var b strings.Builder
	if p.File != "" {
		b.WriteString(p.File)
		if p.Line > 0 {
			fmt.Fprintf(&b, ":%d", p.Line)
		}
		b.WriteString(": ")
	}
	b.WriteString(string(p.Severity))
	b.WriteString(": ")
	if p.Object != "" {
		b.WriteString(p.Object)
		b.WriteString(": ")
	}
	if p.Field != "" {
		b.WriteString(p.Field)
		b.WriteString(": ")
	}
	b.WriteString(p.Message)
	return b.String()
}

// Problems is a list of findings; as an error it reports its errors.
type Problems []Problem

// Errors returns only the problems of SeverityError.
func (ps Problems) Errors() Problems {
	var out Problems
	for _, p := range ps {
		if p.Severity == SeverityError {
			out = append(out, p)
		}
	}
	return out
}

// Warnings returns only the problems of SeverityWarning.
func (ps Problems) Warnings() Problems {
	var out Problems
	for _, p := range ps {
		if p.Severity == SeverityWarning {
			out = append(out, p)
		}
	}
	return out
}

// Err returns the errors among ps as one error, or nil when there are none.
func (ps Problems) Err() error {
	errs := ps.Errors()
	if len(errs) == 0 {
		return nil
	}
	return errs
}

func (ps Problems) Error() string {
	lines := make([]string, len(ps))
	for i, p := range ps {
		lines[i] = p.String()
	}
	return strings.Join(lines, "\n")
}
