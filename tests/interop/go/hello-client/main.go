// Command hello-client is the tutorial's client: it discovers the "hello" service through Consul
// with github.com/mbobakov/grpc-consul-resolver (consul://<addr>/<service>?healthy=true), balances
// with round_robin, sends a steady stream of SayHello RPCs and reports successes and failures as
// JSON. Counting starts at the first successful RPC. It exits 0 whatever the failure count.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	_ "github.com/mbobakov/grpc-consul-resolver"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	pb "google.golang.org/grpc/examples/helloworld/helloworld"
	"google.golang.org/grpc/status"
)

type report struct {
	Sent            int64            `json:"sent"`
	OK              int64            `json:"ok"`
	Failed          int64            `json:"failed"`
	Errors          map[string]int64 `json:"errors"`
	ByBackend       map[string]int64 `json:"by_backend"`
	FirstError      string           `json:"first_error,omitempty"`
	DurationSeconds float64          `json:"duration_seconds"`
}

func main() {
	consul := flag.String("consul", "127.0.0.1:8500", "Consul HTTP address")
	service := flag.String("service", "hello", "service name")
	rate := flag.Int("rate", 200, "RPCs per second")
	timeout := flag.Duration("timeout", time.Second, "per-RPC timeout")
	duration := flag.Duration("duration", 30*time.Second, "how long to send (or until SIGTERM/SIGINT)")
	warmup := flag.Duration("warmup", 15*time.Second, "how long to wait for the first successful RPC")
	out := flag.String("out", "", "JSON report file (default stdout)")
	every := flag.Duration("report-every", 0, "progress lines on stderr at this period (0: none)")
	flag.Parse()
	if *rate <= 0 {
		fmt.Fprintln(os.Stderr, "-rate must be positive")
		os.Exit(2)
	}

	target := fmt.Sprintf("consul://%s/%s?healthy=true", *consul, *service)
	conn, err := grpc.NewClient(target,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultServiceConfig(`{"loadBalancingPolicy":"round_robin"}`))
	if err != nil {
		fmt.Fprintf(os.Stderr, "hello-client: %v\n", err)
		os.Exit(2)
	}
	defer conn.Close()
	client := pb.NewGreeterClient(conn)

	call := func() (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), *timeout)
		defer cancel()
		r, err := client.SayHello(ctx, &pb.HelloRequest{Name: "client"})
		if err != nil {
			return "", err
		}
		_, backend, _ := strings.Cut(r.GetMessage(), " from ")
		return backend, nil
	}
	deadline := time.Now().Add(*warmup)
	for {
		if _, err := call(); err == nil {
			break
		} else if time.Now().After(deadline) {
			log.Printf("hello-client: no successful RPC within %s: %v", *warmup, err)
			break
		}
		time.Sleep(50 * time.Millisecond)
	}

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	rep := report{Errors: map[string]int64{}, ByBackend: map[string]int64{}}
	var mu sync.Mutex
	var wg sync.WaitGroup
	ticker := time.NewTicker(time.Second / time.Duration(*rate))
	defer ticker.Stop()
	var progress <-chan time.Time
	if *every > 0 {
		t := time.NewTicker(*every)
		defer t.Stop()
		progress = t.C
	}
	start := time.Now()
	end := time.After(*duration)
loop:
	for {
		select {
		case <-stop:
			break loop
		case <-end:
			break loop
		case <-progress:
			mu.Lock()
			fmt.Fprintf(os.Stderr, "hello-client: sent=%d ok=%d failed=%d\n", rep.Sent, rep.OK, rep.Failed)
			mu.Unlock()
		case <-ticker.C:
			mu.Lock()
			rep.Sent++
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				backend, err := call()
				mu.Lock()
				defer mu.Unlock()
				if err != nil {
					rep.Failed++
					code := status.Code(err).String()
					rep.Errors[code]++
					if rep.FirstError == "" {
						rep.FirstError = err.Error()
					}
					return
				}
				rep.OK++
				rep.ByBackend[backend]++
			}()
		}
	}
	wg.Wait()
	rep.DurationSeconds = time.Since(start).Seconds()
	data, _ := json.MarshalIndent(rep, "", "  ")
	if *out == "" {
		fmt.Println(string(data))
	} else if err := os.WriteFile(*out, append(data, '\n'), 0o644); err != nil {
		log.Fatalf("hello-client: %v", err)
	}
}
