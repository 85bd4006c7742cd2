// Command hello-client is the tutorial's client: it discovers a service through Consul with
// github.com/mbobakov/grpc-consul-resolver (consul://<addr>/<service>?healthy=true, so only
// instances whose checks all pass), balances with round_robin, sends a steady stream of SayHello
// RPCs, each with its own timeout, and reports successes and failures as JSON.
//
// Counting starts at the first successful RPC (bounded by -warmup; 0 starts at once), so the
// moment the resolver needs for its first answer is not counted as failures. It sends for
// -duration, or until SIGTERM/SIGINT, waits for the RPCs in flight, writes the report and exits 0
// whatever the failure count: the caller decides. Only bad flags (exit 2) or an unwritable report
// file (exit 1) make it exit non-zero.
//
// So that a failure explains itself, the report also says when and where RPCs failed (the first
// error's time and the address it was sent to, and the first -keep-failures failures), every
// address list the resolver handed to gRPC (what Consul answered as passing, when), and every
// connectivity state of the channel.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	_ "github.com/mbobakov/grpc-consul-resolver" // registers the consul:// scheme
	"google.golang.org/grpc"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials/insecure"
	pb "google.golang.org/grpc/examples/helloworld/helloworld"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/status"
)

type report struct {
	Sent            int64            `json:"sent"`
	OK              int64            `json:"ok"`
	Failed          int64            `json:"failed"`
	Errors          map[string]int64 `json:"errors"`     // gRPC code name → count
	ByBackend       map[string]int64 `json:"by_backend"` // server's -name tag → successful RPCs
	FirstError      string           `json:"first_error"`
	DurationSeconds float64          `json:"duration_seconds"` // from the first counted RPC to the last answer
	WarmupSeconds   float64          `json:"warmup_seconds"`   // before counting started
	// Unix times (seconds, microsecond precision), comparable with the host's clock.
	StartedAt float64 `json:"started_at"` // when counting started
	// The first counted failure: when its RPC was sent and ended, and the address it went to
	// ("" when no connection was picked for it, e.g. no address was ready).
	FirstErrorSentAt float64 `json:"first_error_sent_at"`
	FirstErrorAt     float64 `json:"first_error_at"`
	FirstErrorPeer   string  `json:"first_error_peer"`
	// The first -keep-failures counted failures in the order they ended; failures_dropped counts
	// the rest.
	Failures        []failure `json:"failures"`
	FailuresDropped int64     `json:"failures_dropped"`
	// Every address list the resolver gave gRPC (Consul's passing instances), warm-up included.
	ResolverUpdates []resolverUpdate `json:"resolver_updates"`
	// Every connectivity state of the channel (IDLE, CONNECTING, READY, TRANSIENT_FAILURE).
	ChannelStates []channelState `json:"channel_states"`
	// Moments the process itself did not run for a while (a starved CPU share): a ticker every
	// 50 ms that woke at least 250 ms late. RPCs in flight then can time out on our side alone.
	Stalls []stall `json:"stalls"`
}

type stall struct {
	At      float64 `json:"at"`      // when the late tick came
	Seconds float64 `json:"seconds"` // how late it was
}

type failure struct {
	SentAt float64 `json:"sent_at"`
	At     float64 `json:"at"`
	Code   string  `json:"code"`
	Peer   string  `json:"peer"`
	Error  string  `json:"error"`
}

type resolverUpdate struct {
	At        float64  `json:"at"`
	Addresses []string `json:"addresses"`
}

type channelState struct {
	At    float64 `json:"at"`
	State string  `json:"state"`
}

func unix(t time.Time) float64 { return float64(t.UnixMicro()) / 1e6 }

// recordingBuilder wraps the consul:// resolver so that every address list it hands to gRPC is
// recorded with its time: what the client believed was passing, and when.
type recordingBuilder struct {
	resolver.Builder
	record func(resolver.State)
}

func (b recordingBuilder) Build(t resolver.Target, cc resolver.ClientConn, o resolver.BuildOptions) (resolver.Resolver, error) {
	return b.Builder.Build(t, recordingClientConn{cc, b.record}, o)
}

type recordingClientConn struct {
	resolver.ClientConn
	record func(resolver.State)
}

func (c recordingClientConn) UpdateState(s resolver.State) error {
	c.record(s)
	return c.ClientConn.UpdateState(s)
}

func usageError(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "hello-client: "+format+"\n", args...)
	flag.Usage()
	os.Exit(2)
}

func main() {
	consul := flag.String("consul", "127.0.0.1:8500", "Consul HTTP address (host:port)")
	service := flag.String("service", "hello", "Consul service name")
	rate := flag.Int("rate", 200, "RPCs per second, sent at a steady pace")
	timeout := flag.Duration("timeout", time.Second, "per-RPC timeout")
	duration := flag.Duration("duration", 30*time.Second, "how long to send (SIGTERM/SIGINT stop it earlier)")
	warmup := flag.Duration("warmup", 15*time.Second, "longest wait for a first successful RPC before counting starts (0: count from the start)")
	out := flag.String("out", "", "file for the JSON report (default: stdout)")
	every := flag.Duration("report-every", 0, "period of progress lines on stderr (0: none)")
	keepFailures := flag.Int("keep-failures", 200, "how many failures the report lists one by one")
	flag.Parse()
	switch {
	case flag.NArg() > 0:
		usageError("unexpected arguments: %q", flag.Args())
	case *rate <= 0 || *rate > 100000:
		usageError("-rate must be between 1 and 100000, not %d", *rate)
	case *timeout <= 0:
		usageError("-timeout must be positive")
	case *duration <= 0:
		usageError("-duration must be positive")
	case *warmup < 0 || *every < 0 || *keepFailures < 0:
		usageError("-warmup, -report-every and -keep-failures must not be negative")
	case *consul == "" || *service == "":
		usageError("-consul and -service must not be empty")
	}
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)

	rep := report{Errors: map[string]int64{}, ByBackend: map[string]int64{}, Failures: []failure{},
		ResolverUpdates: []resolverUpdate{}, ChannelStates: []channelState{}, Stalls: []stall{}}
	var mu sync.Mutex // guards rep
	go func() {
		const step, late = 50 * time.Millisecond, 250 * time.Millisecond
		last := time.Now()
		for range time.Tick(step) {
			now := time.Now()
			if behind := now.Sub(last) - step; behind >= late {
				mu.Lock()
				rep.Stalls = append(rep.Stalls, stall{unix(now), behind.Seconds()})
				mu.Unlock()
			}
			last = now
		}
	}()

	consulResolver := resolver.Get("consul")
	if consulResolver == nil {
		log.Fatalf("hello-client: the consul:// resolver is not registered")
	}
	record := func(s resolver.State) {
		addrs := make([]string, 0, len(s.Addresses))
		for _, a := range s.Addresses {
			addrs = append(addrs, a.Addr)
		}
		mu.Lock()
		rep.ResolverUpdates = append(rep.ResolverUpdates, resolverUpdate{unix(time.Now()), addrs})
		mu.Unlock()
	}
	target := fmt.Sprintf("consul://%s/%s?healthy=true", *consul, *service)
	conn, err := grpc.NewClient(target,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithResolvers(recordingBuilder{consulResolver, record}),
		grpc.WithDefaultServiceConfig(`{"loadBalancingPolicy":"round_robin"}`))
	if err != nil {
		usageError("%s: %v", target, err)
	}
	defer conn.Close()
	client := pb.NewGreeterClient(conn)
	go func() {
		state := conn.GetState()
		for {
			mu.Lock()
			rep.ChannelStates = append(rep.ChannelStates, channelState{unix(time.Now()), state.String()})
			mu.Unlock()
			if !conn.WaitForStateChange(context.Background(), state) || state == connectivity.Shutdown {
				return
			}
			state = conn.GetState()
		}
	}()

	// One RPC; on failure, the address it was sent to ("" if none was picked).
	call := func() (string, string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), *timeout)
		defer cancel()
		var p peer.Peer
		r, err := client.SayHello(ctx, &pb.HelloRequest{Name: "client"}, grpc.Peer(&p))
		if err != nil {
			addr := ""
			if p.Addr != nil {
				addr = p.Addr.String()
			}
			return "", addr, err
		}
		_, backend, _ := strings.Cut(r.GetMessage(), " from ")
		return backend, "", nil
	}

	began := time.Now()
	stopped := false
	if *warmup > 0 {
		deadline := began.Add(*warmup)
		for !stopped {
			_, _, err := call()
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				log.Printf("hello-client: no successful RPC within -warmup %s (%v); counting anyway", *warmup, err)
				break
			}
			select {
			case <-stop:
				stopped = true
			case <-time.After(50 * time.Millisecond):
			}
		}
	}
	rep.WarmupSeconds = time.Since(began).Seconds()
	if !stopped {
		log.Printf("hello-client: %s: sending %d RPC/s for %s", target, *rate, *duration)
	}

	var wg sync.WaitGroup
	send := func() {
		defer wg.Done()
		sentAt := time.Now()
		backend, addr, err := call()
		endedAt := time.Now()
		mu.Lock()
		defer mu.Unlock()
		if err != nil {
			rep.Failed++
			code := status.Code(err).String()
			rep.Errors[code]++
			if rep.FirstError == "" {
				rep.FirstError = err.Error()
				rep.FirstErrorSentAt = unix(sentAt)
				rep.FirstErrorAt = unix(endedAt)
				rep.FirstErrorPeer = addr
			}
			if len(rep.Failures) < *keepFailures {
				rep.Failures = append(rep.Failures, failure{unix(sentAt), unix(endedAt), code, addr, err.Error()})
			} else {
				rep.FailuresDropped++
			}
			return
		}
		rep.OK++
		rep.ByBackend[backend]++
	}
	start := time.Now()
	rep.StartedAt = unix(start)
	progressLine := func() {
		mu.Lock()
		defer mu.Unlock()
		tags := make([]string, 0, len(rep.ByBackend))
		for t := range rep.ByBackend {
			tags = append(tags, t)
		}
		sort.Strings(tags)
		parts := make([]string, 0, len(tags))
		for _, t := range tags {
			parts = append(parts, fmt.Sprintf("%s=%d", t, rep.ByBackend[t]))
		}
		now := time.Now()
		fmt.Fprintf(os.Stderr, "hello-client: unix=%.3f t=%.3fs sent=%d ok=%d failed=%d by_backend={%s}\n",
			float64(now.UnixMicro())/1e6, now.Sub(start).Seconds(), rep.Sent, rep.OK, rep.Failed, strings.Join(parts, " "))
	}

	var progress <-chan time.Time
	if *every > 0 {
		t := time.NewTicker(*every)
		defer t.Stop()
		progress = t.C
	}
	// A steady pace: the n-th RPC leaves at start + n/rate, whatever the scheduling jitter; after a
	// stall of over a second (the process stopped, say) the pace starts afresh instead of bursting.
	interval := time.Second / time.Duration(*rate)
	end := start.Add(*duration)
	next := start
	pace := time.NewTimer(0)
	defer pace.Stop()
	for !stopped && next.Before(end) {
		select {
		case <-stop:
			stopped = true
		case <-progress:
			progressLine()
		case <-pace.C:
			now := time.Now()
			if now.Sub(next) > time.Second {
				next = now
			}
			for !next.After(now) && next.Before(end) {
				mu.Lock()
				rep.Sent++
				mu.Unlock()
				wg.Add(1)
				go send()
				next = next.Add(interval)
			}
			pace.Reset(time.Until(next))
		}
	}
	wg.Wait()
	if *every > 0 {
		progressLine()
	}

	mu.Lock()
	rep.DurationSeconds = time.Since(start).Seconds()
	data, _ := json.MarshalIndent(rep, "", "  ")
	mu.Unlock()
	data = append(data, '\n')
	if *out == "" {
		os.Stdout.Write(data)
		return
	}
	// Written whole, then renamed, so a reader never sees half a report.
	tmp := *out + ".tmp"
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		log.Fatalf("hello-client: %v", err)
	}
	if err := os.Rename(tmp, *out); err != nil {
		log.Fatalf("hello-client: %v", err)
	}
}
