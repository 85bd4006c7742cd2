// Command hello-server is the gRPC "hello" server of the Consul + gRPC tutorial: grpc-go's
// helloworld Greeter with grpc-go's standard health server, whose status is set for "" and for
// "helloworld.Greeter". Replies read "Hello <name> from <tag>", so clients can see which backend
// answered.
//
// Health: SIGUSR1 sets every status to NOT_SERVING, SIGUSR2 to SERVING; the optional control port
// does the same over HTTP (POST /serving, POST /not-serving).
//
// Stopping: SIGTERM/SIGINT stop it gracefully (health NOT_SERVING, then GracefulStop, bounded by
// -grace, after which Stop), or at once with -shutdown immediate (Stop: connections closed, RPCs
// in flight cancelled, the worst case for clients). A second signal during a graceful stop stops at
// once. It exits 0 either way.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"google.golang.org/grpc"
	pb "google.golang.org/grpc/examples/helloworld/helloworld"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

type greeter struct {
	pb.UnimplementedGreeterServer
	name string
	work time.Duration
}

func (g *greeter) SayHello(ctx context.Context, in *pb.HelloRequest) (*pb.HelloReply, error) {
	if g.work > 0 {
		t := time.NewTimer(g.work)
		defer t.Stop()
		select {
		case <-t.C:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	return &pb.HelloReply{Message: fmt.Sprintf("Hello %s from %s", in.GetName(), g.name)}, nil
}

// The services whose health status is kept: the whole server ("") and the Greeter.
var services = []string{"", pb.Greeter_ServiceDesc.ServiceName}

func setAll(hs *health.Server, status healthpb.HealthCheckResponse_ServingStatus) {
	for _, s := range services {
		hs.SetServingStatus(s, status)
	}
	log.Printf("hello-server: health now %s", status)
}

func usageError(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "hello-server: "+format+"\n", args...)
	flag.Usage()
	os.Exit(2)
}

func main() {
	listen := flag.String("listen", "127.0.0.1:50051", "gRPC listen address")
	name := flag.String("name", "", "tag put in replies, \"Hello <name> from <tag>\" (default: the bound address)")
	control := flag.String("control", "", "optional HTTP control address (POST /serving, POST /not-serving)")
	grace := flag.Duration("grace", 5*time.Second, "bound on the graceful stop, after which the server stops at once")
	work := flag.Duration("work", 0, "time each SayHello takes (simulated work, so RPCs are in flight)")
	shutdown := flag.String("shutdown", "graceful", "on SIGTERM/SIGINT: graceful (GracefulStop, bounded by -grace) or immediate (Stop: close connections, cancel RPCs in flight)")
	flag.Parse()
	if flag.NArg() > 0 {
		usageError("unexpected arguments: %q", flag.Args())
	}
	if *shutdown != "graceful" && *shutdown != "immediate" {
		usageError("-shutdown must be graceful or immediate, not %q", *shutdown)
	}
	if *grace <= 0 || *work < 0 {
		usageError("-grace must be positive and -work not negative")
	}
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)

	// Handle the signals before anything is bound: SIGUSR1/2 would otherwise kill the process.
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGTERM, syscall.SIGINT)

	lis, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatalf("hello-server: listen: %v", err)
	}
	if *name == "" {
		*name = lis.Addr().String()
	}
	srv := grpc.NewServer()
	hs := health.NewServer()
	setAll(hs, healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(srv, hs)
	pb.RegisterGreeterServer(srv, &greeter{name: *name, work: *work})

	if *control != "" {
		clis, err := net.Listen("tcp", *control)
		if err != nil {
			log.Fatalf("hello-server: control listen: %v", err)
		}
		mux := http.NewServeMux()
		mux.HandleFunc("POST /serving", func(w http.ResponseWriter, _ *http.Request) {
			setAll(hs, healthpb.HealthCheckResponse_SERVING)
			fmt.Fprintln(w, "SERVING")
		})
		mux.HandleFunc("POST /not-serving", func(w http.ResponseWriter, _ *http.Request) {
			setAll(hs, healthpb.HealthCheckResponse_NOT_SERVING)
			fmt.Fprintln(w, "NOT_SERVING")
		})
		go func() {
			if err := http.Serve(clis, mux); err != nil && !errors.Is(err, net.ErrClosed) {
				log.Printf("hello-server: control: %v", err)
			}
		}()
		log.Printf("hello-server: control on http://%s", clis.Addr())
	}

	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		for sig := range sigs {
			switch sig {
			case syscall.SIGUSR1:
				setAll(hs, healthpb.HealthCheckResponse_NOT_SERVING)
				continue
			case syscall.SIGUSR2:
				setAll(hs, healthpb.HealthCheckResponse_SERVING)
				continue
			}
			if *shutdown == "immediate" {
				log.Printf("hello-server: %s: stopping immediately", sig)
				srv.Stop()
				return
			}
			log.Printf("hello-server: %s: stopping gracefully (at most %s)", sig, *grace)
			hs.Shutdown() // every status NOT_SERVING from now on
			done := make(chan struct{})
			go func() { srv.GracefulStop(); close(done) }()
			bound := time.NewTimer(*grace)
			for {
				select {
				case <-done:
					log.Printf("hello-server: stopped gracefully")
					return
				case <-bound.C:
					log.Printf("hello-server: graceful stop took over %s: stopping now", *grace)
					srv.Stop()
					return
				case again := <-sigs:
					if again == syscall.SIGTERM || again == syscall.SIGINT {
						log.Printf("hello-server: %s again: stopping now", again)
						srv.Stop()
						return
					}
				}
			}
		}
	}()

	fmt.Printf("hello-server listening on %s\n", lis.Addr())
	if err := srv.Serve(lis); err != nil {
		log.Fatalf("hello-server: %v", err)
	}
	// Serve returns nil only once Stop or GracefulStop has been called; exit 0 when it is done.
	<-stopped
}
