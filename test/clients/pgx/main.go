// A test client on pgx (Go), which prepares each statement, then binds it with one result format
// code per column (binary for the types it reads in binary): reads a JSON array of statements on
// stdin ({"sql": "...", "args": [...]}; string arguments go as text, numbers in binary) and prints
// each result's columns and rows as JSON lines.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"

	"github.com/jackc/pgx/v5"
)

type statement struct {
	SQL  string `json:"sql"`
	Args []any  `json:"args"`
}

type result struct {
	Columns []string    `json:"columns,omitempty"`
	Rows    [][]*string `json:"rows,omitempty"`
	Error   string      `json:"error,omitempty"`
	Code    string      `json:"code,omitempty"`
}

func main() {
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer conn.Close(ctx)
	var statements []statement
	if err := json.NewDecoder(os.Stdin).Decode(&statements); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	out := bufio.NewWriter(os.Stdout)
	defer out.Flush()
	encoder := json.NewEncoder(out)
	for _, s := range statements {
		encoder.Encode(run(ctx, conn, s))
	}
}

// run gives the rows as pgx decoded them, each value printed with %v (NULL as null).
func run(ctx context.Context, conn *pgx.Conn, s statement) result {
	// JSON numbers as a Go program would pass them: whole ones as int64, others as float64 (pgx sends both in binary).
	for i, a := range s.Args {
		if f, ok := a.(float64); ok && f == float64(int64(f)) {
			s.Args[i] = int64(f)
		}
	}
	rows, err := conn.Query(ctx, s.SQL, s.Args...)
	if err != nil {
		return failure(err)
	}
	defer rows.Close()
	var r result
	for _, f := range rows.FieldDescriptions() {
		r.Columns = append(r.Columns, f.Name)
	}
	for rows.Next() {
		values, err := rows.Values()
		if err != nil {
			return failure(err)
		}
		row := make([]*string, len(values))
		for i, v := range values {
			if v != nil {
				text := fmt.Sprintf("%v", v)
				row[i] = &text
			}
		}
		r.Rows = append(r.Rows, row)
	}
	if err := rows.Err(); err != nil {
		return failure(err)
	}
	return r
}

func failure(err error) result {
	if pgErr, ok := err.(interface{ SQLState() string }); ok {
		return result{Error: err.Error(), Code: pgErr.SQLState()}
	}
	return result{Error: err.Error()}
}
